"""Deterministic multi-domain corpus for the embedded tiny models, built from offline sources.

    python -m emo_cli.lab.corpus --out corpus --domains code,medical,legal

Each domain becomes `<out>/<domain>.train.jsonl` and `<out>/<domain>.heldout.jsonl` with one
`{"text": ...}` document per line (a few hundred to about a thousand tokens), plus
`<out>/manifest.json` recording the settings, source versions and file hashes. Nothing extracted
is ever committed: the builder reads installed packages at build time.

Sources (docs/design.md#the-demo-corpus): code = the Python standard library (tests excluded); medical =
ICD-10-CM tabular XML of the pip package simple-icd-10-cm; legal = SPDX licence texts of the pip
package spdx; math = Metamath set.mm prose comments (Debian metamath-databases) plus generated
arithmetic/algebra worksheets; literature = the King James Bible (Debian bible-kjv). The first three
are pip/stdlib only (PIP_DOMAINS), which is what `emo demo` uses. Debian packages come from the
system when installed, else from `apt-get download` + `dpkg-deb -x` into a cache directory.

Determinism: every source is read in sorted order, documents are cut by fixed rules, the held-out
split is a hash of the text (data.heldout_split), and caps keep the documents with the smallest
text hashes, so a larger cap only adds documents.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from emo_cli.data.documents import Document, heldout_split
from emo_cli.errors import EmoError
from emo_cli.lab.mathgen import worksheets

ALL_DOMAINS = ("code", "medical", "legal", "math", "literature")
PIP_DOMAINS = ("code", "medical", "legal")
DEBIAN_PACKAGES = {"math": ("metamath-databases",), "literature": ("bible-kjv", "bible-kjv-text")}
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MIN_DOC_CHARS = 200  # shorter pieces (an empty module, a one-line licence) are not documents


@dataclass
class CorpusSpec:
    domains: tuple[str, ...] = ALL_DOMAINS
    max_chars_per_domain: int = 2_500_000  # training text per domain (held-out comes on top)
    heldout_frac: float = 0.05
    max_heldout_docs: int = 80  # per domain: enough for a stable loss, cheap to evaluate
    min_chars: int = 600
    max_chars: int = 3000  # ~750 English tokens: most documents fit a 512-token context whole
    seed: int = 0  # generated math worksheets
    fetch: bool = True  # allow `apt-get download` for Debian-sourced domains

    def validate(self) -> None:
        bad = [d for d in self.domains if d not in ALL_DOMAINS]
        if bad or not self.domains:
            raise EmoError(f"corpus: unknown domain {bad[0] if bad else '(none)'!r} "
                           f"(choose from {', '.join(ALL_DOMAINS)})")
        if len(set(self.domains)) != len(self.domains):
            raise EmoError("corpus: a domain is listed twice")
        if not 0.0 < self.heldout_frac < 0.5:
            raise EmoError(f"corpus: heldout_frac must be in (0, 0.5), got {self.heldout_frac}")
        if not 100 <= self.min_chars < self.max_chars:
            raise EmoError("corpus: need 100 <= min_chars < max_chars")
        if self.max_chars_per_domain < 10 * self.max_chars:
            raise EmoError("corpus: max_chars_per_domain must hold at least 10 documents")
        if self.max_heldout_docs < 1:
            raise EmoError("corpus: max_heldout_docs must be at least 1")


def cache_dir() -> Path:
    base = os.environ.get("EMO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emo"
    return Path(base)


# ---- cutting text into documents ---------------------------------------------------------------
def split_long(text: str, max_chars: int) -> list[str]:
    """Cut one oversized piece at line breaks (or hard, for a single huge line)."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        if len(cur) + len(line) > max_chars and cur:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return out


def pack(pieces: Iterable[str], min_chars: int, max_chars: int, header: str = "", sep: str = "\n") -> list[str]:
    """Greedily join consecutive pieces into documents of min..max characters (header repeated
    on each); a short tail joins the previous document rather than standing alone."""
    budget = max_chars - len(header)
    docs, cur = [], []
    size = 0
    for piece in pieces:
        for p in (split_long(piece, budget) if len(piece) > budget else [piece]):
            if cur and size + len(sep) + len(p) > budget and size >= min_chars:
                docs.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += len(p) + len(sep)
    if cur:
        if docs and size < min_chars:
            docs[-1].extend(cur)
        else:
            docs.append(cur)
    return [header + sep.join(d).strip() for d in docs]


# ---- code: the Python standard library ---------------------------------------------------------
CODE_EXCLUDE_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages",
                     "lib2to3", "turtledemo", "ensurepip"}
TOP_LEVEL = re.compile(r"^(def |class |async def |@|if __name__)")


def code_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if set(rel.parts[:-1]) & CODE_EXCLUDE_DIRS or rel.name.startswith("test_") or rel.name.endswith("_test.py"):
            continue
        files.append(p)
    return files


def code_docs(spec: CorpusSpec) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for p in code_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        # top-level definitions are the natural cut points of a module
        blocks, cur = [], []
        for line in text.splitlines(keepends=True):
            if TOP_LEVEL.match(line) and cur and not (cur[-1].startswith("@")):
                blocks.append("".join(cur))
                cur = []
            cur.append(line)
        blocks.append("".join(cur))
        header = f"# {p.relative_to(root).as_posix()}\n"
        docs += pack(blocks, spec.min_chars, spec.max_chars, header=header, sep="")
    return docs


# ---- medical: ICD-10-CM tabular list -----------------------------------------------------------
NOTE_KINDS = (("inclusionTerm", ""), ("includes", "Includes: "), ("excludes1", "Excludes1: "),
              ("excludes2", "Excludes2: "), ("codeFirst", "Code first: "), ("codeAlso", "Code also: "),
              ("useAdditionalCode", "Use additional code: "), ("notes", "Note: "), ("sevenChrNote", "Note: "))


def _notes(elem: ET.Element, indent: str) -> list[str]:
    lines = []
    for tag, label in NOTE_KINDS:
        for group in elem.findall(tag):
            for note in group.findall("note"):
                lines.append(f"{indent}  {label}{' '.join((note.text or '').split())}")
    seven = elem.find("sevenChrDef")
    if seven is not None:
        exts = [f"{e.get('char')} {e.text}" for e in seven.findall("extension")]
        lines.append(f"{indent}  7th character: " + "; ".join(exts))
    return lines


def _diag_lines(diag: ET.Element, depth: int) -> list[str]:
    indent = "  " * depth
    lines = [f"{indent}{diag.findtext('name')} {' '.join((diag.findtext('desc') or '').split())}"]
    lines += _notes(diag, indent)
    for child in diag.findall("diag"):
        lines += _diag_lines(child, depth + 1)
    return lines


def package_dir(name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (simple_icd_10_cm parses
    its whole XML at import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmoError(f"this corpus domain needs the pip package {pip_name} (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def icd10_xml() -> Path:
    data = package_dir("simple_icd_10_cm", "simple-icd-10-cm==1.5.0") / "data"
    found = sorted(p for p in data.glob("icd10c-tabular-*.xml"))
    if not found:
        raise EmoError(f"simple-icd-10-cm: no icd10c-tabular-*.xml in {data}")
    return found[-1]


def medical_docs(spec: CorpusSpec) -> list[str]:
    root = ET.parse(icd10_xml()).getroot()
    docs = []
    for chapter in root.findall("chapter"):
        ch = f"ICD-10-CM chapter {chapter.findtext('name')}: {chapter.findtext('desc')}\n"
        for section in chapter.findall("section"):
            header = ch + f"Section: {' '.join((section.findtext('desc') or '').split())}\n\n"
            pieces = ["\n".join(_notes(section, ""))] if _notes(section, "") else []
            pieces += ["\n".join(_diag_lines(d, 0)) for d in section.findall("diag")]
            docs += pack(pieces, spec.min_chars, spec.max_chars, header=header)
    return docs


# ---- legal: SPDX licence texts -----------------------------------------------------------------
def legal_docs(spec: CorpusSpec) -> list[str]:
    data = package_dir("spdx", "spdx==2.5.1") / "data"
    docs = []
    for p in sorted(data.glob("*.txt")):
        if p.name.startswith("deprecated_"):
            continue
        text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()
        if len(text) < 200:
            continue
        paragraphs = [q.strip() for q in re.split(r"\n\s*\n", text) if q.strip()]
        docs += pack(paragraphs, spec.min_chars, spec.max_chars, sep="\n\n")
    return docs


# ---- Debian-sourced files ----------------------------------------------------------------------
def debian_root(domain: str, probe: str, fetch: bool) -> Path:
    """Directory under which `probe` (an absolute Debian path) exists: / when the package is
    installed, else a cache extraction of the .debs, downloaded with apt-get when allowed."""
    if Path(probe).exists():
        return Path("/")
    pkgs = DEBIAN_PACKAGES[domain]
    root = cache_dir() / "debian" / "root"
    if (root / probe.lstrip("/")).exists():
        return root
    hint = (f"the {domain} domain needs Debian package(s) {', '.join(pkgs)}: `apt-get install "
            f"{' '.join(pkgs)}`, or build with fetching allowed, or leave {domain} out (e.g. --domains "
            f"{','.join(PIP_DOMAINS)})")
    if not fetch:
        raise EmoError(hint)
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise EmoError(hint + "; apt-get/dpkg-deb not found")
    debs = cache_dir() / "debian" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["apt-get", "download", *pkgs], cwd=debs, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["apt-get failed"])[-1]
        raise EmoError(f"apt-get download {' '.join(pkgs)} failed ({last}); {hint}")
    tmp = root.with_name("root.partial")
    if root.exists():
        shutil.copytree(root, tmp, dirs_exist_ok=True)
    for pkg in pkgs:
        for deb in sorted(debs.glob(f"{pkg}_*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    if not (root / probe.lstrip("/")).exists():
        raise EmoError(f"{probe} not found in the downloaded packages; {hint}")
    return root


def debian_version(domain: str) -> str:
    """Package versions for the manifest (installed, else the cached .deb file names)."""
    out = []
    for pkg in DEBIAN_PACKAGES[domain]:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True) \
            if shutil.which("dpkg-query") else None
        if r is not None and r.returncode == 0 and r.stdout:
            out.append(f"{pkg}={r.stdout}")
            continue
        debs = sorted((cache_dir() / "debian" / "debs").glob(f"{pkg}_*.deb"))
        out.append(f"{pkg}={debs[-1].name.split('_')[1]}" if debs else f"{pkg}=?")
    return " ".join(out)


# ---- math: Metamath prose + generated worksheets -----------------------------------------------
SETMM = "/usr/share/metamath/databases/set.mm"
MM_COMMENT = re.compile(r"\$\((.*?)\$\)\s*(?:([\w.-]+)\s+\$([ape])\s+(.*?)\s*\$[=.])?", re.S)


def metamath_pieces(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    pieces = []
    for m in MM_COMMENT.finditer(text):
        prose = " ".join(m.group(1).split())
        if len(prose) < 200 or prose.startswith(("#*#", "=-=", "-.-", "....")):
            continue  # section banners and short remarks carry little prose
        if m.group(2) and len(m.group(4)) < 300:
            kind = {"a": "Axiom", "p": "Theorem", "e": "Hypothesis"}[m.group(3)]
            prose = f"{kind} {m.group(2)}: {' '.join(m.group(4).split())}\n{prose}"
        pieces.append(prose)
    return pieces


def worksheet_docs(seed: int, target_chars: int, min_chars: int, max_chars: int) -> list[str]:
    """Generated worksheets (mathgen) packed into documents until `target_chars` characters."""
    docs, total = [], 0
    for header, problems in worksheets(seed):
        if total >= target_chars:
            break
        for doc in pack(problems, min_chars, max_chars, header=header, sep="\n\n"):
            docs.append(doc)
            total += len(doc)
    return docs


def math_docs(spec: CorpusSpec) -> list[str]:
    root = debian_root("math", SETMM, spec.fetch)
    docs = pack(metamath_pieces(root / SETMM.lstrip("/")), spec.min_chars, spec.max_chars,
                header="Metamath set.mm\n\n", sep="\n\n")
    # a fifth of the domain is generated arithmetic and algebra with worked solutions
    target = sum(map(len, docs)) // 4
    return docs + worksheet_docs(spec.seed, target, spec.min_chars, spec.max_chars)


# ---- literature: the King James Bible ----------------------------------------------------------
BIBLE_DATA = "/usr/lib/bible.data"
HEADING = re.compile(r"^([1-3]? ?[A-Z][A-Za-z ]+?) (\d+)$")
VERSE = re.compile(r"^\s+(\d+) (.*)$")


def kjv_chapters(bible_bin: Path, data_dir: Path) -> list[tuple[str, int, list[str]]]:
    r = subprocess.run([str(bible_bin), "-p", str(data_dir), "gen1:1-rev22:21"], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "80"})
    if r.returncode != 0 or not r.stdout:
        raise EmoError(f"{bible_bin}: could not dump the KJV text ({r.stderr.strip()[:200]})")
    chapters: list[tuple[str, int, list[str]]] = []
    for line in r.stdout.splitlines():
        h = HEADING.match(line)
        v = VERSE.match(line)
        if h and not line.startswith(" "):
            chapters.append((h.group(1), int(h.group(2)), []))
        elif v and chapters:
            chapters[-1][2].append(f"{v.group(1)} {v.group(2).strip()}")
        elif line.strip() and chapters and chapters[-1][2]:
            chapters[-1][2][-1] += " " + line.strip()  # continuation of a wrapped verse
    return chapters


def literature_docs(spec: CorpusSpec) -> list[str]:
    root = debian_root("literature", BIBLE_DATA, spec.fetch)
    binary = Path("/usr/bin/bible") if root == Path("/") else root / "usr/bin/bible"
    if not binary.exists():
        raise EmoError(f"{binary}: the bible program is missing (Debian package bible-kjv)")
    docs, book, pieces = [], None, []
    for name, num, verses in kjv_chapters(binary, root / "usr/lib") + [("", 0, [])]:
        if name != book and pieces:
            docs += pack(pieces, spec.min_chars, spec.max_chars, sep="\n\n")
            pieces = []
        book = name
        pieces.append(f"{name} {num}\n" + "\n".join(verses))
    return docs


DOMAIN_BUILDERS: dict[str, Callable[[CorpusSpec], list[str]]] = {
    "code": code_docs, "medical": medical_docs, "legal": legal_docs, "math": math_docs,
    "literature": literature_docs}


def source_version(domain: str) -> str:
    if domain == "code":
        return f"python-stdlib={sys.version.split()[0]}"
    if domain == "medical":
        return f"simple-icd-10-cm={metadata.version('simple-icd-10-cm')} ({icd10_xml().name})"
    if domain == "legal":
        return f"spdx={metadata.version('spdx')}"
    return debian_version(domain)


# ---- split, cap, write -------------------------------------------------------------------------
def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def split_domain(texts: list[str], spec: CorpusSpec) -> tuple[list[str], list[str]]:
    """(train, held-out): hash split, then caps by smallest text hash; source order is kept."""
    seen, docs = set(), []
    for t in texts:
        if len(t) >= MIN_DOC_CHARS and t not in seen:  # licence and code boilerplate repeats; a duplicate would leak
            seen.add(t)
            docs.append(Document(t, "", len(docs)))
    train, held = heldout_split(docs, spec.heldout_frac)
    held_keep = set(sorted(range(len(held)), key=lambda i: _text_hash(held[i].text))[:spec.max_heldout_docs])
    total, train_keep = 0, set()
    for i in sorted(range(len(train)), key=lambda i: _text_hash(train[i].text)):
        if total >= spec.max_chars_per_domain:
            break
        train_keep.add(i)
        total += len(train[i].text)
    return ([d.text for i, d in enumerate(train) if i in train_keep],
            [d.text for i, d in enumerate(held) if i in held_keep])


def _write_jsonl(path: Path, texts: list[str]) -> str:
    tmp = path.with_name(path.name + ".partial")
    h = hashlib.sha256()
    with open(tmp, "w", encoding="utf-8") as f:
        for t in texts:
            line = json.dumps({"text": t}, ensure_ascii=False) + "\n"
            f.write(line)
            h.update(line.encode())
    os.replace(tmp, path)
    return h.hexdigest()[:16]


def read_manifest(out_dir: Path) -> dict | None:
    f = Path(out_dir) / MANIFEST
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def _spec_key(spec: CorpusSpec, domain: str) -> dict:
    d = asdict(spec)
    d.pop("domains")
    d.pop("fetch")
    return {"format": FORMAT_VERSION, "domain": domain, **d}


def _up_to_date(manifest: dict | None, out_dir: Path, spec: CorpusSpec, domain: str) -> bool:
    entry = (manifest or {}).get("domains", {}).get(domain)
    if not entry or entry.get("settings") != _spec_key(spec, domain):
        return False
    return all((out_dir / f"{domain}.{part}.jsonl").exists() for part in ("train", "heldout"))


def build_corpus(out_dir: Path, spec: CorpusSpec, log: Callable[[str], None] | None = None) -> dict:
    """Build (or reuse, when the manifest says the settings match) every domain of `spec`.

    Returns the manifest: per domain the source version, document counts, characters and file hashes.
    """
    spec.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir) or {"domains": {}}
    for domain in spec.domains:
        if _up_to_date(manifest, out_dir, spec, domain):
            continue
        if log:
            log(f"building corpus domain {domain}")
        train, held = split_domain(DOMAIN_BUILDERS[domain](spec), spec)
        if len(train) < 10 or not held:
            raise EmoError(f"corpus: domain {domain} produced too few documents ({len(train)} train, {len(held)} held out)")
        manifest["domains"][domain] = {
            "source": source_version(domain), "settings": _spec_key(spec, domain),
            "train_docs": len(train), "heldout_docs": len(held),
            "train_chars": sum(map(len, train)), "heldout_chars": sum(map(len, held)),
            "train_sha256": _write_jsonl(out_dir / f"{domain}.train.jsonl", train),
            "heldout_sha256": _write_jsonl(out_dir / f"{domain}.heldout.jsonl", held)}
        tmp = out_dir / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out_dir / MANIFEST)
    return manifest


def domain_files(out_dir: Path, domain: str) -> tuple[Path, Path]:
    return Path(out_dir) / f"{domain}.train.jsonl", Path(out_dir) / f"{domain}.heldout.jsonl"


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m emo_cli.lab.corpus", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="corpus", help="output directory (default: corpus)")
    ap.add_argument("--domains", default=",".join(ALL_DOMAINS),
                    help=f"comma-separated subset of {','.join(ALL_DOMAINS)}; pip-only: {','.join(PIP_DOMAINS)}")
    ap.add_argument("--max-chars-per-domain", type=int, default=CorpusSpec.max_chars_per_domain)
    ap.add_argument("--no-fetch", action="store_true", help="never run apt-get download")
    args = ap.parse_args(argv)
    spec = CorpusSpec(domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
                      max_chars_per_domain=args.max_chars_per_domain, fetch=not args.no_fetch)
    try:
        manifest = build_corpus(Path(args.out), spec, log=lambda m: print(m, file=sys.stderr))
    except EmoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for d in spec.domains:
        e = manifest["domains"][d]
        print(f"{d:<11} {e['train_docs']:>6} train docs {e['train_chars']:>10,} chars   "
              f"{e['heldout_docs']:>4} held out   {e['source']}")


if __name__ == "__main__":
    main()
