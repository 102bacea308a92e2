"""The seam doctor's cost: `find_seams` against the batched encoding it checks, on the zoo's chats and larger synthetic sets.

Run: HF_HUB_OFFLINE=1 python bench/bench_seams.py [--sizes 2000,20000,100000] [--repeat 3]
Each line is a JSON object: the data, the template, the records, the trained bot turns checked, the seams and drifting stops
found, and the best-of-`repeat` seconds of `encode_chats(..., token_ends=[])` (the build's encoding) and of `find_seams`.
"zoo" is the zoo's chat train split (2,000 chats, 2,490 answers, all starting with `It`); "synthetic-N" is N chats of 2-4
exchanges (some with a system prompt) from the zoo's chat generator, with answers opened five ways (`That`, `The`, `Sure`,
`Hello`, `It`), so that some merge with a trailing space. Templates: Llama 3 (special tokens: the prompts' tails after
`<|end_header_id|>` are encoded alone) and plain tags with a trailing space (`"[{role}] "`, `"\\n"`: every prompt encoded whole).
"""
import argparse, json, os, random, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
OPENERS = ["That is {c}", "The answer: {c}", "Sure, {c}", "Hello! {c}", "{c}"]


def synthetic(n, seed=0):
    "n chats of 2-4 exchanges (30% with a system prompt), answers opened by one of `OPENERS` in turn."
    from alignlab.sample_data import chat_turn
    rng, out, k = random.Random(seed), [], 0
    for _ in range(n):
        msgs = [{"role": "system", "content": "Answer with the category only."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(2, 4)):
            _, q, a = chat_turn(rng); k += 1
            msgs += [{"role": "user", "content": q}, {"role": "bot", "content": OPENERS[k % len(OPENERS)].format(c=a)}]
        out.append(msgs)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,100000"); ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    from alignlab import zoo
    from alignlab.encoding import encode_chats
    from alignlab.seams import find_seams
    from alignlab.templates import LLAMA3, ChatTemplate
    tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    plain = ChatTemplate({"system": "system", "user": "user", "bot": "bot"}, "[{role}] ", "\n")
    sets = [("zoo", [json.loads(l)["messages"] for l in (zoo.get("chat") / "train.jsonl").read_text().splitlines()])]
    sets += [(f"synthetic-{n}", synthetic(int(n))) for n in a.sizes.split(",") if n]
    for name, chats in sets:
        for tname, tpl in (("llama3", LLAMA3), ("plain", plain)):
            enc = doc = float("inf")
            for _ in range(a.repeat):
                te = []; t0 = time.perf_counter()
                store, kept, status = encode_chats(tpl, tok, chats, token_ends=te)
                t1 = time.perf_counter(); rep = find_seams(tpl, tok, chats, store, kept, te, status=status); t2 = time.perf_counter()
                enc, doc = min(enc, t1 - t0), min(doc, t2 - t1)
            print(json.dumps(dict(data=name, template=tname, records=len(chats), turns=rep.turns, prompts=rep.prompts, seams=len(rep.seams),
                                  stops=len(rep.stops), encode_s=round(enc, 3), doctor_s=round(doc, 3), overhead=round(doc / enc, 2))), flush=True)


if __name__ == "__main__":
    main()
