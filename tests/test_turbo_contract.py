"""The turbo-alignment contract (nbs/16_turbo): every field of turbo's settings classes is accepted, refused with a reason the
loader gives too, or not a setting; every default that differs has its rule; the field list ships with the package."""
from pathlib import Path
import pytest
from alignlab.settings import SettingsError, load_settings
from alignlab.turbo import _turbo_value, FieldStatus, contract, contract_problems, contract_summary, turbo_classes

ROOT = Path(__file__).parents[1]


def test_every_turbo_field_has_a_status_and_every_differing_default_a_rule():
    rows = contract()
    assert len(rows) == sum(len(c["fields"]) for c in turbo_classes().values()) > 400
    problems = contract_problems(rows)
    assert not problems, "\n".join(f"{p.turbo_class}.{p.field}: {p.status} {p.note}" for p in problems)
    assert set(contract_summary(rows)) <= {"accepted", "refused", "inert", "not a setting"}
    assert all(r.note for r in rows if r.status in ("refused", "inert", "not a setting"))


def test_the_checker_reports_an_unknown_field_and_a_stale_rule():
    rows = contract()
    fake = FieldStatus("TokenizerSettings", "no_such_field", "None", "missing", "TokenizerSettings")
    assert contract_problems(rows + [fake]) == [fake]
    import alignlab.turbo as t
    t.DEFAULTS_DIFFER["TokenizerSettings.use_fast"] = "a rule for defaults that agree"
    try: assert [(p.turbo_class, p.field) for p in contract_problems()] == [("TokenizerSettings", "use_fast")]
    finally: del t.DEFAULTS_DIFFER["TokenizerSettings.use_fast"]


@pytest.mark.parametrize("cls, src, says", [
    ("models.ModelSettings", {"model_path": "x", "model_type": "seq2seq"}, "model_type: 'seq2seq': encoder-decoder models are not supported"),
    ("models.ModelSettings", {"model_path": "x", "model_type": "qwen_with_ulysses"}, "Ulysses sequence parallelism"),
    ("data.DatasetSettings", {"sources": [{"name": "a", "records_path": "x"}], "dataset_type": "ddpo"}, "dataset_type: 'ddpo': not built yet"),
    ("models.ModelSettings", {"model_path": "x", "liger_kernels_settings": {"use_rope": True}}, "liger"),
    ("models.TransformersSettings", {"load_in_8bit": True}, "load_in_8bit"),
])
def test_a_refused_turbo_value_gets_the_tables_reason_in_one_line(cls, src, says):
    import importlib
    mod, name = cls.rsplit(".", 1)
    C = getattr(importlib.import_module("alignlab." + mod), name)
    with pytest.raises(SettingsError) as e: load_settings(C, src)
    msg = str(e.value)
    assert says in msg and "\n" not in msg, msg
    rows = {(r.turbo_class, r.field): r for r in contract()}
    if "model_type" in src and src["model_type"] in ("seq2seq", "qwen_with_ulysses"):
        r = rows["ModelType", src["model_type"]]
        assert r.status == "refused" and r.note in msg


def test_turbo_defaults_that_change_results_are_turbos():
    rows = {(r.turbo_class, r.field): r for r in contract()}
    for key in [("GeneratorTransformersSettings", "do_sample"), ("BaseGeneratorSettings", "stop_strings"), ("ModelTransformersSettings", "torch_dtype"),
                ("TokenizerSettings", "use_fast"), ("ChatDatasetSettings", "random_cut_seed"), ("LoraSettings", "target_modules"),
                ("TrainerSettings", "fp16"), ("TrainerSettings", "load_best_model_at_end"), ("TrainerSettings", "gradient_accumulation_steps")]:
        r = rows[key]
        assert r.status == "accepted" and r.alignlab_default == repr(_turbo_value(r.turbo_default, {})), r


def test_the_field_list_ships_as_package_data_and_nothing_reads_the_research_notes():
    assert "alignlab/turbo_fields.json" in (ROOT / "MANIFEST.in").read_text()
    for p in (ROOT / "alignlab").rglob("*.py"):
        assert "shared/research" not in p.read_text(), p
