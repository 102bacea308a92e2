"""The cherry-pick review app (nbs/19_review, 19a_ratings, 19b_review_app): ratings from eight processes and from eight browser
sessions at once, each in the files exactly once; the ratings file trains DPO as is; `alignlab review` served on 127.0.0.1 and
driven in headless Chromium (load, change steps, rate, find the rating in the JSONL); the static export opens offline.

The review stores are real: `review.demo_runs` trains two tiny LoRA runs on the zoo and lets `CherryPicks` store their
generations at steps 0, 3 and 6 (built once, cached beside the zoo)."""
import contextlib, json, multiprocessing as mp, os, subprocess, sys, time
from pathlib import Path
import pytest

from alignlab.ratings import RatingStore, RATINGS_NAME, PAIRS_NAME, KTO_NAME, locked, _hammer
from alignlab.review import Review, demo_runs, select_prompts

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def runs():
    return demo_runs()


def _read_lines(p):
    "Every line of a JSONL file parsed (a torn line fails the test), and the raw bytes end with a newline."
    raw = Path(p).read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(l) for l in raw.split(b"\n")[:-1]]


# ---- the store: eight processes ----

def test_eight_processes_rating_at_once_lose_nothing(tmp_path):
    """8 processes x 60 pair ratings, each with a 20 kB note: every rating in ratings.jsonl and pair_preferences.jsonl exactly
    once, every line parses, and both files list the ratings in the same order (the lock makes each rating's two lines one unit)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), f"rev{k}", 60)) for k in range(8)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    rs, pairs = _read_lines(tmp_path / RATINGS_NAME), _read_lines(tmp_path / PAIRS_NAME)
    got = sorted(r["note"][:r["note"].index(":x")] for r in rs)
    assert got == sorted(f"rev{k}:{i}" for k in range(8) for i in range(60))
    assert [p["id"] for p in pairs] == [r["id"] for r in rs] and len({r["id"] for r in rs}) == 480
    for r, p in zip(rs, pairs):  # each training record is its rating's
        w = r["a"] if r["winner"] == "a" else r["b"]
        assert p["answer_w"]["content"] == w["answer"] and p["answer_w"]["content"].startswith(r["reviewer"] + " answer")


def test_the_lock_is_held_across_processes(tmp_path):
    """While another process holds the ratings directory's lock, a rating waits for it (the negative control: without the
    holder the same rating is immediate)."""
    code = ("import sys, time; sys.path.insert(0, %r)\nfrom alignlab.ratings import locked\n"
            "with locked(%r):\n    print('held', flush=True); time.sleep(2.0)\n") % (str(ROOT), str(tmp_path))
    ctx = [{"role": "user", "content": "Hi"}]
    s = RatingStore(tmp_path)
    t = time.time(); s.mark("ana", ctx, {"answer": "Hello"}, True); free = time.time() - t
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    t = time.time(); s.mark("bo", ctx, {"answer": "Hello"}, False); waited = time.time() - t
    p.wait(10)
    assert free < 1.0 and waited > 1.0, (free, waited)
    assert [r["reviewer"] for r in s.ratings()] == ["ana", "bo"]


# ---- the loop into preference training ----

def test_ratings_train_dpo_and_kto_as_is(runs, tmp_path):
    """The app rates pairs and marks on the demo runs; pair_preferences.jsonl trains DPO through `alignlab.run.train` unchanged
    (2 steps, the LoRA adapter moves), and kto.jsonl builds the `kto` dataset."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    from alignlab import zoo
    from alignlab.datasets import build_dataset
    from alignlab.review_app import ReviewApp
    app = ReviewApp(runs, ratings_dir=tmp_path / "ratings", reviewer="ana")
    # the base (step 0) against the collapsed run's last step: they disagree on every prompt on any CPU (within the lr-3e-3 run,
    # steps 0 and 6 disagreed on 8 of 8 prompts natively but on 1 of 8 under SSE kernels: 6 steps are a knife's edge)
    app.w_a.value, app.w_b.value, app.w_disagree.value = "lr-3e-3 @ 0", "lr-2e-2 @ 6", True
    n = len(app.keys)
    assert n >= 4
    for i in range(n): app.rate_pair("ab"[i % 2])
    app.mark("a", True); app.mark("b", False)
    rs = app.store.ratings()
    assert [r["kind"] for r in rs] == ["pair"] * n + ["mark"] * 2 and all(r["reviewer"] == "ana" for r in rs)
    assert len({r["prompt_key"] for r in rs[:n]}) == n  # the app moved on after each pair
    tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    src = lambda f, kind: {"sources": [{"name": "ratings", "records_path": str(tmp_path / "ratings" / f), "sample_rate": 1}],
                           "dataset_type": kind, "max_tokens_count": 64}
    assert len(build_dataset(src(PAIRS_NAME, "pair_preferences"), tok)) == n
    kto = build_dataset(src(KTO_NAME, "kto"), tok)
    assert len(kto) == 2
    from alignlab.run import train
    lora = {"name": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    s = train({"log_path": str(tmp_path / "dpo"), "seed": 0,
               "model_settings": {"model_path": "tiny-llama", "model_type": "causal", "transformers_settings": {"torch_dtype": "float32"},
                                  "peft_settings": lora},
               "train_dataset_settings": src(PAIRS_NAME, "pair_preferences"),
               "trainer_settings": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                                    "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1, "report_to": [], "disable_tqdm": True,
                                    "load_best_model_at_end": False, "fp16": False, "loss_settings": {"loss_type": "sigmoid", "beta": 0.1}}}, progress=False)
    assert s["objective"] == "dpo" and s["steps"] == 2
    ad = load_file(str(tmp_path / "dpo" / "final" / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in ad.items() if "lora_B" in k)  # LoRA B starts at zero: the DPO steps moved it


# ---- the browser ----

@contextlib.contextmanager
def served(run_dirs, ratings_dir):
    "`alignlab review RUN_DIR ... --port P` in a subprocess; yields the app's URL."
    from alignlab.browser import free_port, _wait_http
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "alignlab", "review", *map(str, run_dirs), "--port", str(port), "--ratings_dir", str(ratings_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "BOKEH_RESOURCES": "server"})
    url = f"http://127.0.0.1:{port}/review"
    try:
        _wait_http(url, p, 90)
        yield url
    finally:
        p.terminate()
        try: p.wait(10)
        except subprocess.TimeoutExpired: p.kill()


def _wait_for(pred, timeout=60.0, what=""):
    t = time.time()
    while time.time() - t < timeout:
        v = pred()
        if v: return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cli_serves_on_localhost_by_default():
    from alignlab.cli import parser
    a = parser().parse_args(["review", "runA", "runB"])
    assert a.address == "127.0.0.1" and a.run_dirs == ["runA", "runB"] and a.export is None


def test_review_app_in_chromium(runs, page, tmp_path):
    """Load the served app, move side A to another step, go to the next prompt, rate B better with a note: the rating is in
    ratings.jsonl and pair_preferences.jsonl with the reviewer, the prompt and the versions shown. A screenshot is saved."""
    from playwright.sync_api import expect
    rv = Review(runs)
    with served(runs, tmp_path / "ratings") as url:
        page.set_viewport_size({"width": 1400, "height": 1100})
        page.goto(url)
        expect(page.locator(".rv-prompt")).to_be_visible(timeout=60000)
        expect(page.locator("th.rv-a")).to_contain_text("lr-3e-3 @ 6 (A)")
        expect(page.locator(".rv-whoami")).to_contain_text("enter your name")
        selects = page.locator("select")
        assert selects.nth(0).input_value() == "lr-3e-3 @ 6" and selects.nth(1).input_value() == "lr-2e-2 @ 6"
        selects.nth(0).select_option("lr-3e-3 @ 0")  # navigate steps: side A is now the base model
        expect(page.locator("th.rv-a")).to_contain_text("lr-3e-3 @ 0 (A)")
        first = list(rv.prompts)[0]
        expect(page.locator(".rv-prompt .rv-muted").first).to_have_text(first)
        page.get_by_role("button", name="next ▶").click()
        second = list(rv.prompts)[1]
        expect(page.locator(".rv-prompt .rv-muted").first).to_have_text(second)
        expect(page.locator(".rv-count")).to_contain_text("2 of 8")
        page.get_by_placeholder("your name").fill("ana")
        expect(page.locator(".rv-whoami")).to_contain_text("reviewing as ana")
        page.get_by_placeholder("note (optional)").fill("blank answers after the jump")
        page.wait_for_timeout(300)
        assert rv.get(second, "lr-3e-3 @ 0")["answer"].strip() != rv.get(second, "lr-2e-2 @ 6")["answer"].strip(), "equal answers: nothing to rate"
        page.get_by_role("button", name="B is better").click()
        expect(page.locator(".rv-status")).to_contain_text("saved rating-", timeout=30000)
        expect(page.locator(".rv-ratings")).to_contain_text("ana")
        shot = ROOT / "nbs" / "images" / "review_app.png"
        if os.environ.get("ALIGNLAB_SCREENSHOTS") == "1": shot.parent.mkdir(exist_ok=True)
        else: shot = tmp_path / "review_app.png"
        page.screenshot(path=str(shot), full_page=True)
    rs = _read_lines(tmp_path / "ratings" / RATINGS_NAME)
    assert len(rs) == 1
    r = rs[0]
    assert (r["reviewer"], r["prompt_key"], r["winner"], r["a"]["version"], r["b"]["version"]) == ("ana", second, "b", "lr-3e-3 @ 0", "lr-2e-2 @ 6")
    assert r["note"] == "blank answers after the jump"
    assert r["a"]["answer"] == rv.get(second, "lr-3e-3 @ 0")["answer"]
    pair = _read_lines(tmp_path / "ratings" / PAIRS_NAME)
    assert pair == [{"id": r["id"], "context": rv.prompts[second]["prompt"], "answer_w": {"role": "bot", "content": r["b"]["answer"]},
                     "answer_l": {"role": "bot", "content": r["a"]["answer"]}}]
    from PIL import Image
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100


def test_eight_browser_sessions_rate_at_once(runs, tmp_path):
    """Eight Chromium pages against one served app: each names its reviewer, then all click "A is better" round after round
    without waiting for the server. Every click is in ratings.jsonl exactly once (per reviewer: 5 ratings on 5 distinct
    prompts, as the app moves on after each), and both files parse."""
    from playwright.sync_api import sync_playwright, expect
    from alignlab.browser import chromium_path, CHROMIUM_ARGS
    if not chromium_path(): pytest.skip("chromium is not installed")
    n_pages, rounds = 8, 5
    rv = Review(runs)
    differ = len(select_prompts(rv, "lr-3e-3 @ 6", "lr-2e-2 @ 6", disagree=True))  # the app's starting sides
    assert differ >= 1, "the demo runs' last steps answer alike: no pair to rate"
    with served(runs, tmp_path / "ratings") as url, sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            pages = [b.new_context().new_page() for _ in range(n_pages)]
            for p in pages: p.goto(url)
            for i, p in enumerate(pages):
                expect(p.locator(".rv-prompt")).to_be_visible(timeout=90000)
                p.get_by_placeholder("your name").fill(f"rev{i}")
            for i, p in enumerate(pages): expect(p.locator(".rv-whoami")).to_contain_text(f"reviewing as rev{i}", timeout=30000)
            for p in pages: p.get_by_text("only where A and B disagree").click()  # a pair of equal answers is refused, not rated
            for p in pages: expect(p.locator(".rv-count")).to_contain_text(f"of {differ} prompt(s)", timeout=30000)
            for _ in range(rounds):
                for p in pages: p.get_by_role("button", name="A is better").click()
            f = tmp_path / "ratings" / RATINGS_NAME
            _wait_for(lambda: f.exists() and f.read_bytes().count(b"\n") >= n_pages * rounds, 90, "all ratings")
            time.sleep(1.0)  # nothing more arrives
        finally: b.close()
    rs = _read_lines(f)
    assert len(rs) == n_pages * rounds and len({r["id"] for r in rs}) == len(rs)
    for i in range(n_pages):
        mine = [r for r in rs if r["reviewer"] == f"rev{i}"]
        assert len(mine) == rounds and len({r["prompt_key"] for r in mine}) == min(rounds, differ)
    assert [p["id"] for p in _read_lines(tmp_path / "ratings" / PAIRS_NAME)] == [r["id"] for r in rs]


def test_static_export_opens_offline(runs, page, tmp_path):
    """`alignlab review ... --export` writes one HTML file; loaded from file:// with every network request blocked, it shows the
    curves, every prompt (a prompt opens on click: its versions side by side and the diff) and the ratings; it asked for nothing."""
    from playwright.sync_api import expect
    s = RatingStore(tmp_path / "ratings")
    rv = Review(runs)
    key, (a, b) = next((k, (a, b)) for k in rv.prompts for a in rv.versions for b in rv.versions
                       if rv.get(k, a)["answer"].strip() != rv.get(k, b)["answer"].strip())
    for who, w in (("ana", "a"), ("bo", "a"), ("cy", "b")):
        s.rate_pair(who, rv.prompts[key]["prompt"], rv.get(key, a), rv.get(key, b), w, prompt_key=key)
    out = tmp_path / "share" / "review.html"
    r = subprocess.run([sys.executable, "-m", "alignlab", "review", *map(str, runs), "--ratings_dir", str(tmp_path / "ratings"), "--export", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    asked = []
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://") else (asked.append(route.request.url), route.abort()))
    page.goto(out.as_uri())
    expect(page.locator("details.rv-item")).to_have_count(8)
    assert page.locator("svg").count() >= 3 and page.locator("svg").first.is_visible()
    expect(page.locator(".rv-agreement")).to_contain_text("agreement: 33%")  # ana-bo agree, each disagrees with cy
    expect(page.locator(".rv-ratings")).to_contain_text("cy")
    page.locator("details.rv-item summary").first.click()
    expect(page.locator("details.rv-item").first.locator("th.rv-a")).to_contain_text("(A)")
    assert asked == []


def test_cli_bad_run_dir_is_one_line(tmp_path, capsys):
    from alignlab.cli import main
    assert main(["review", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"alignlab review: error: {tmp_path}: no review store; expected a run directory holding cherry_picks.jsonl " \
                  "(a run trained with cherry_pick_settings) or that JSONL file", err
