"""Every public function, public method and constructor of the exported modules documents each parameter inline (fastcore docments)."""
import importlib, inspect


def _modules() -> list:
    import alignlab._modidx as m
    return [n for n in m.d["syms"] if n != "alignlab._modidx"]


def _functions(o) -> list:
    "The plain function(s) behind a module or class attribute: unwraps classmethod, staticmethod, pydantic proxies, lru_cache."
    if isinstance(o, (classmethod, staticmethod)): o = o.__func__
    if not inspect.isfunction(o) and hasattr(o, "wrapped"): o = o.wrapped  # pydantic's decorator proxy
    if isinstance(o, (classmethod, staticmethod)): o = o.__func__
    if isinstance(o, property): return [f for f in (o.fget, o.fset) if f is not None]
    if callable(o) and hasattr(o, "__wrapped__"): o = inspect.unwrap(o)
    return [o] if inspect.isfunction(o) else []


def _params(f) -> list:
    "The parameters that need a docment: all but *args, **kwargs, and a method's self / cls."
    method = "." in f.__qualname__.split("<locals>.")[-1]
    return [p.name for p in inspect.signature(f).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not (method and p.name in ("self", "cls"))]


def missing_docments(where:str, f) -> list:
    "`where(param)` for each parameter of `f` without a docment."
    from fastcore.docments import docments
    ps = _params(f)
    if not ps: return []
    d = docments(f, full=False, returns=False)
    return [f"{where}({p})" for p in ps if not d.get(p)]


def public_callables(mod) -> list:
    "`(qualified name, function)` of the public functions of `mod` and the public methods of its public classes."
    out, seen = [], set()
    def add(name, f):
        # defined in this module's file: not inherited from transformers / pydantic, not a generated dataclass __init__
        if id(f) in seen or not f.__module__.startswith("alignlab") or f.__code__.co_filename != mod.__file__: return
        seen.add(id(f)); out.append((f"{mod.__name__}.{name}", f))
    for n, o in vars(mod).items():
        if n.startswith("_"): continue
        if inspect.isclass(o) and o.__module__ == mod.__name__:
            for k in o.__mro__:
                if not k.__module__.startswith("alignlab"): continue
                for mn, mo in vars(k).items():
                    if mn.startswith("_") and mn != "__init__": continue  # constructors are public API too
                    for f in _functions(mo):
                        if f.__qualname__.split("<locals>.")[-1].startswith(k.__qualname__ + "."): add(f"{n}.{mn}", f)
        else:
            for f in _functions(o):
                if f.__module__ == mod.__name__: add(n, f)
    return out


def test_the_checker_reports_an_undocumented_function():
    """Negative control: the same helper flags parameters without a comment (and only those)."""
    def undocumented(a, b:int=1, *args, **kw): return a
    def documented(a, # a docment
                   b:int=1, # another
                   *args, **kw): return a
    class K:
        def method(self, x, # documented
                   y): return x
    assert missing_docments("tests.undocumented", undocumented) == ["tests.undocumented(a)", "tests.undocumented(b)"]
    assert missing_docments("tests.documented", documented) == []
    assert missing_docments("tests.K.method", K.method) == ["tests.K.method(y)"]  # self is not a parameter to document


def test_constructors_are_in_scope_and_generated_ones_are_not():
    """A hand-written `__init__` is checked; a dataclass's or pydantic model's generated one is not (it has no source to comment)."""
    import alignlab.collate, alignlab.templates, alignlab.settings, alignlab.experiment
    scope = lambda mod: {w for w, _ in public_callables(mod)}
    assert "alignlab.collate.Collator.__init__" in scope(alignlab.collate)
    assert "alignlab.experiment.Experiment.__init__" in scope(alignlab.experiment)  # inherited from its private base, still checked
    assert "alignlab.templates.ChatTemplate.__init__" not in scope(alignlab.templates)  # @dataclass
    assert not [w for w in scope(alignlab.settings) if w.endswith(".__init__")]  # pydantic models
    class K:
        def __init__(self, a, # documented
                     b): pass
    assert missing_docments("tests.K.__init__", K.__init__) == ["tests.K.__init__(b)"]


def test_every_public_function_documents_its_parameters():
    found, missing = 0, []
    for name in _modules():
        for where, f in public_callables(importlib.import_module(name)):
            found += bool(_params(f))
            missing += missing_docments(where, f)
    assert found > 100, f"only {found} public functions with parameters found: the walk is broken"
    assert not missing, f"{len(missing)} parameters without a docment (a `# comment` after each):\n" + "\n".join(missing)
