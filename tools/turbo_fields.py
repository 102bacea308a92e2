"""Regenerate `alignlab/turbo_fields.json` — turbo-alignment's settings surface, as data — from the research notes.

Run by a developer when the notes change (`python tools/turbo_fields.py ../shared/research/turbo_settings`); alignlab never reads
the notes at run or test time, only the JSON this writes."""
import json, re, sys
from pathlib import Path

REVISIONS = {"head_0.0.4.md": "0.0.4", "5563a3f_full_pipelines.md": "5563a3f"}
CLASS = re.compile(r"^- \*\*(\w+)\*\*\(([^)]*)\): (.*)$")
FIELD = re.compile(r"^`(\w+)`(?:: (.*?))? = (.*)$")

def parse(md:str) -> dict:
    out, module = {}, None
    for line in md.splitlines():
        if line.startswith("## "): module = line[3:].strip(); continue
        m = CLASS.match(line)
        if not m: continue
        name, bases, rest = m.groups()
        fields = {}
        if rest.strip() != "—":
            for part in re.split(r"; (?=`)", rest):
                f = FIELD.match(part.strip())
                if not f: raise ValueError(f"{module}: {name}: cannot read {part!r}")
                fname, ftype, default = f.groups()
                fields[fname] = {"type": ftype, "default": default}
        # two classes share a name in different modules (e.g. `S`): keep both, keyed by module
        out[f"{module}:{name}"] = {"class": name, "module": module, "bases": [b.strip() for b in bases.split(",") if b.strip()],
                                   "fields": fields}
    return out

def main(folder):
    merged = {}
    for fname, rev in REVISIONS.items():
        for key, c in parse((Path(folder) / fname).read_text()).items():
            prev = merged.setdefault(key, {**c, "fields": {}, "revisions": []})
            prev["revisions"].append(rev)
            for f, v in c["fields"].items():
                prev["fields"].setdefault(f, {**v, "revisions": []})["revisions"].append(rev)
    dest = Path(__file__).parents[1] / "alignlab" / "turbo_fields.json"
    dest.write_text(json.dumps({"source": "turbo-alignment settings at 0.0.4 (72e737d) and 5563a3f (last with multimodal, RAG, KTO)",
                                "classes": merged}, indent=1, ensure_ascii=False) + "\n")
    n = sum(len(c["fields"]) for c in merged.values())
    print(f"{dest}: {len(merged)} classes, {n} fields")

if __name__ == "__main__": main(sys.argv[1] if len(sys.argv) > 1 else "../shared/research/turbo_settings")
