#!/usr/bin/env python3
"""Fill the project's git-ignored ``data/`` folder with the evaluation data the configs use.

Layout written under the destination folder (default: ``<repo root>/data``)::

    zsre/zsre_edit_1000.json                     (--only zsre)
    counterfact/counterfact_edit_2000.json       (--only counterfact)
    counterfact/counterfact-train.json
    hallucination/hallucination-edit.json        (--only hallucination)
    hallucination/hallucination-train.json
    temporal/temporal-edit.json                  (--only temporal)
    temporal/temporal-train.json
    eren/cfh_filtered.json                       (--only eren)
    eren/fever_filtered_small.json
    reference/smollm2_zsre_pre_edit_200.jsonl    (--only reference)

Two ways to get the files:

* ``--from DIR`` (the default when ``<repo root>/../shared/data`` exists): copy them from a
  local folder with the same layout.  Files whose size and sha256 already match are left alone;
  every copy goes to a temporary file in the destination folder first and is then moved into
  place with ``os.replace``, so an interrupted run never leaves a half-written file.
* ``--download``: fetch them from their original public sources (GitHub repositories named in
  the shared data README) and apply the documented transformation (e.g. "first 2000 records").
  Every result is checked against the sha256 of the project's copy; ``--no-verify`` keeps a
  file that differs.  ``reference/`` was computed for this project and has no public source,
  so ``--download`` skips it (and fails if it was asked for with ``--only reference``).

Exit status: 0 on success, 1 when a file is missing from the source folder or cannot be
downloaded, 2 on bad arguments.  Only the Python standard library is used.

Examples::

    python3 scripts/get_data.py                          # copy from ../shared/data
    python3 scripts/get_data.py --from /mnt/data --dest /tmp/data --only zsre --only eren
    python3 scripts/get_data.py --download --timeout 60
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / "data"
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "data"

RAW = "https://raw.githubusercontent.com"
# All URLs use the repositories' ``main`` branch.  Paths without a "# unverified URL" mark were
# seen in a listing of the repository's files; those with it are best guesses.
REPAIR = RAW + "/sci-m-wang/REPAIR/main"
EREN = RAW + "/thunlp/EREN/main"
REVISIT = RAW + "/WanliYoung/Revisit-Editing-Evaluation/main"
KNOWLEDGE_SPREAD = RAW + "/Jometeorie/KnowledgeSpread/main"
COUNTERFACT_DRIVE = "https://drive.google.com/drive/folders/1w9r7CL_a9k3HiorfSvE-RiShHvvrshoy"

GROUPS = ("zsre", "counterfact", "hallucination", "temporal", "eren", "reference")


class GetDataError(Exception):
    """A failure that is reported to the user as one clear line."""


class NetworkError(GetDataError):
    """The network (not just one URL) looks unreachable: no point trying more URLs."""


# --------------------------------------------------------------------------- transformations


def _dump_json(records: object) -> bytes:
    # The project's transformed files are ``json.dumps(..., indent=1)`` with ASCII escapes and
    # no trailing newline; writing them the same way reproduces them byte for byte.
    return json.dumps(records, indent=1).encode("ascii")


def _load_json_list(data: bytes, what: str) -> list:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise GetDataError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(obj, list):
        raise GetDataError(f"{what}: expected a JSON list, got {type(obj).__name__}")
    return obj


def identity(data: bytes) -> bytes:
    return data


def first_n(n: int) -> Callable[[bytes], bytes]:
    """Keep the first ``n`` records of a JSON list."""

    def transform(data: bytes) -> bytes:
        records = _load_json_list(data, "download")
        if len(records) < n:
            raise GetDataError(f"download has {len(records)} records, expected at least {n}")
        return _dump_json(records[:n])

    transform.__doc__ = f"first {n} records"
    return transform


def zsre_from_easyedit_log(n: int) -> Callable[[bytes], bytes]:
    """Rebuild WISE-format ZsRE records from an EasyEdit/REPAIR results log.

    Each log entry has ``requested_rewrite = {prompt, target_new, rephrase_prompt, subject,
    loc_prompt, locality: {neighborhood: {prompt, ground_truth}}}``; the WISE record is
    ``{subject, src, rephrase, alt, loc, loc_ans, loc_prompt}``.
    """

    def transform(data: bytes) -> bytes:
        entries = _load_json_list(data, "ZsRE log")
        if len(entries) < n:
            raise GetDataError(f"ZsRE log has {len(entries)} entries, expected at least {n}")
        out = []
        for i, entry in enumerate(entries[:n]):
            try:
                rw = entry["requested_rewrite"]
                loc = rw["locality"]["neighborhood"]
                out.append(
                    {
                        "subject": rw["subject"],
                        "src": rw["prompt"],
                        "rephrase": rw["rephrase_prompt"],
                        "alt": rw["target_new"],
                        "loc": loc["prompt"],
                        "loc_ans": loc["ground_truth"],
                        "loc_prompt": rw["loc_prompt"],
                    }
                )
            except (KeyError, TypeError) as exc:
                raise GetDataError(f"ZsRE log entry {i} lacks field {exc}") from None
        return _dump_json(out)

    transform.__doc__ = f"first {n} log entries, converted to WISE ZsRE records"
    return transform


# --------------------------------------------------------------------------- file table


@dataclass(frozen=True)
class DataFile:
    group: str
    relpath: str
    size: int
    sha256: str
    # Candidate URLs, tried in order (a 404 moves on to the next one).
    urls: Tuple[str, ...] = ()
    transform: Callable[[bytes], bytes] = field(default=identity, compare=False)
    note: str = ""


FILES: Tuple[DataFile, ...] = (
    DataFile(
        "zsre", "zsre/zsre_edit_1000.json", 401393,
        "cff6cd3b73955daf926cee20266a29212e4f9775f97aa80d22bdd4eed4b84826",
        # WISE's ZsRE edit split with its train-split loc_prompts, as logged by REPAIR
        # (the raw data/wise/ZsRE/*.json files are Git LFS objects there).
        urls=(REPAIR + "/examples/outputs/llama-3-8b-instruct_WISE_N=1000_Sequential=True.json",),
        transform=zsre_from_easyedit_log(1000),
    ),
    DataFile(
        "counterfact", "counterfact/counterfact_edit_2000.json", 659818,
        "65a6a5805b98702a61b778b159d41dbbf818e71874cd01b9327c0a0f2e6beb23",
        urls=(
            # unverified URL: that repository's README fetches its data/ from Google Drive.
            REVISIT + "/data/counterfact-edit.json",
            # Mirror of the same EasyEdit counterfact-edit.json (same records, same order).
            KNOWLEDGE_SPREAD + "/data/counterfact/counterfact-edit.json",
        ),
        transform=first_n(2000),
        note=f"counterfact-edit.json is also in the Google Drive folder {COUNTERFACT_DRIVE}",
    ),
    DataFile(
        "counterfact", "counterfact/counterfact-train.json", 3949873,
        "f7d443ffb0c5da6cbe816cdac45281ccb3f204b8a840f00d07a4aafa949bcd76",
        # EasyEdit's CounterFact train split (10,000 records), the routing text of
        # configs/counterfact.yaml; kept byte for byte.
        urls=(KNOWLEDGE_SPREAD + "/data/counterfact/counterfact-train.json",),
        note=f"counterfact-train.json is also in the Google Drive folder {COUNTERFACT_DRIVE}",
    ),
    DataFile(
        "hallucination", "hallucination/hallucination-edit.json", 538052,
        "523ce88b5299047bf58ea3ad8b7e9d12635592543df54b58c8eaf16d5e68aaaf",
        urls=(REPAIR + "/data/wise/hallucination/hallucination-edit.json",),
    ),
    DataFile(
        "hallucination", "hallucination/hallucination-train.json", 274920,
        "ef280a0ce9aa194c545e7a1c7983df181b8e48dbfb1945ffe40e1903cca0d297",
        urls=(REPAIR + "/data/wise/hallucination/hallucination-train.json",),  # unverified URL
    ),
    DataFile(
        "temporal", "temporal/temporal-edit.json", 158826,
        "3c27956224d56111762e7b56ca0595dc638cc005faaf322a01c48ecd5283aef8",
        urls=(REPAIR + "/data/wise/temporal/temporal-edit.json",),
    ),
    DataFile(
        "temporal", "temporal/temporal-train.json", 155949,
        "0ba8c40de49bd0d0ffc1da69ac17fcfce6db8c32bf36a7df5c88730b48e1172a",
        urls=(REPAIR + "/data/wise/temporal/temporal-train.json",),
    ),
    DataFile(
        "eren", "eren/cfh_filtered.json", 2120847,
        "79bbce4b42e6c5bdc0c1b26845fe4b149068a21a12c2f9dc89b92ec0c8750bed",
        urls=(EREN + "/data/cfh_filtered.json",),
    ),
    DataFile(
        "eren", "eren/fever_filtered_small.json", 2316927,
        "d3fb874ed49f7d2657ab5c5ec47d2d32a95be76aa688da3f663ec02646f181e1",
        urls=(EREN + "/data/fever_filtered_small.json",),
    ),
    DataFile(
        "reference", "reference/smollm2_zsre_pre_edit_200.jsonl", 13108,
        "0eccdfb1f538e5b5ec3615488eb730508d05c98ef83225345a20ce7f90791dc5",
        urls=(),  # computed for this project; no public source
        note="computed for this project (pre-edit SmolLM2 accuracies); copy it with --from",
    ),
)


def selected_files(only: Optional[Sequence[str]]) -> List[DataFile]:
    groups = set(only) if only else set(GROUPS)
    return [f for f in FILES if f.group in groups]


# --------------------------------------------------------------------------- helpers


def file_digest(path: Path) -> Tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def same_content(a: Path, size: int, sha256: str) -> bool:
    """True if file ``a`` exists and has exactly this size and sha256."""
    try:
        if not a.is_file() or a.stat().st_size != size:
            return False
        return file_digest(a)[1] == sha256
    except OSError:
        return False


def _atomic_write(dest: Path, fill: Callable[[object], None]) -> None:
    """Write ``dest`` through a temporary file in its folder, then ``os.replace`` it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(dest.parent), prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_copy(src: Path, dest: Path) -> None:
    def fill(out):
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)

    _atomic_write(dest, fill)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    _atomic_write(dest, lambda out: out.write(data))


def report(status: str, relpath: str, detail: str = "") -> None:
    print(f"{status:<11} {relpath}" + (f"  ({detail})" if detail else ""), flush=True)


# --------------------------------------------------------------------------- --from


def copy_from(source: Path, dest: Path, files: Sequence[DataFile]) -> int:
    if not source.is_dir():
        print(f"error: source folder {source} does not exist (pass --from DIR or --download)",
              file=sys.stderr)
        return 1
    missing: List[str] = []
    for f in files:
        src, dst = source / f.relpath, dest / f.relpath
        if not src.is_file():
            missing.append(f.relpath)
            report("missing", f.relpath, f"not in {source}")
            continue
        size, sha = file_digest(src)
        if same_content(dst, size, sha):
            report("up to date", f.relpath)
            continue
        atomic_copy(src, dst)
        report("copied", f.relpath)
    if missing:
        print(f"error: {len(missing)} required file(s) missing from {source}:", file=sys.stderr)
        for rel in missing:
            print(f"  {rel}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- --download


def fetch(url: str, timeout: float) -> bytes:
    """GET ``url``; never takes (much) longer than ``timeout`` seconds in total.

    The request runs in a daemon thread so that a stuck DNS lookup or a server that trickles
    bytes cannot hold the script past the deadline.
    """
    result: Dict[str, object] = {}

    def worker() -> None:
        try:
            deadline = time.monotonic() + timeout
            req = urllib.request.Request(url, headers={"User-Agent": "repair_pl-get_data/1.0"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                chunks = []
                while True:
                    if time.monotonic() > deadline:
                        raise socket.timeout("download took too long")
                    read = getattr(resp, "read1", resp.read)
                    chunk = read(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
            result["data"] = b"".join(chunks)
        except BaseException as exc:  # reported by the caller
            result["error"] = exc

    thread = threading.Thread(target=worker, name="get_data-fetch", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        raise NetworkError(f"{url}: no answer within {timeout:g} s")
    exc = result.get("error")
    if exc is None:
        return result["data"]  # type: ignore[return-value]
    if isinstance(exc, urllib.error.HTTPError):
        raise GetDataError(f"{url}: HTTP {exc.code} {exc.reason}")
    if isinstance(exc, urllib.error.URLError):
        raise NetworkError(f"{url}: network unreachable ({exc.reason})")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        raise NetworkError(f"{url}: timed out after {timeout:g} s")
    if isinstance(exc, OSError):
        raise NetworkError(f"{url}: {exc}")
    raise GetDataError(f"{url}: {exc!r}")


def download_one(f: DataFile, timeout: float, verify: bool) -> bytes:
    errors = []
    for url in f.urls:
        try:
            raw = fetch(url, timeout)
        except NetworkError:
            raise
        except GetDataError as exc:  # e.g. HTTP 404: try the next candidate
            errors.append(str(exc))
            continue
        if raw.startswith(b"version https://git-lfs.github.com/spec/"):
            errors.append(f"{url}: got a Git LFS pointer, not the file")
            continue
        try:
            data = f.transform(raw)
        except GetDataError as exc:
            errors.append(f"{url}: {exc}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        if verify and (len(data) != f.size or digest != f.sha256):
            errors.append(
                f"{url}: result differs from the project's copy (size {len(data)} vs {f.size}, "
                f"sha256 {digest[:12]}... vs {f.sha256[:12]}...); --no-verify keeps it anyway"
            )
            continue
        return data
    hint = f"; {f.note}" if f.note else ""
    raise GetDataError("; ".join(errors) + hint)


def download(dest: Path, files: Sequence[DataFile], timeout: float, verify: bool,
             explicit: bool) -> int:
    failed: List[str] = []
    for i, f in enumerate(files):
        if not f.urls:
            report("skipped", f.relpath, f"no public source: {f.note}")
            if explicit:
                failed.append(f"{f.relpath}: no public source ({f.note})")
            continue
        if same_content(dest / f.relpath, f.size, f.sha256):
            report("up to date", f.relpath)
            continue
        try:
            data = download_one(f, timeout, verify)
        except NetworkError as exc:
            report("failed", f.relpath)
            print(f"error: download failed, the network looks unreachable: {exc}", file=sys.stderr)
            rest = [g.relpath for g in files[i + 1:] if g.urls]
            if rest:
                print(f"error: not attempted: {', '.join(rest)}", file=sys.stderr)
            print("hint: copy the files from a local folder with --from DIR instead",
                  file=sys.stderr)
            return 1
        except GetDataError as exc:
            report("failed", f.relpath)
            failed.append(f"{f.relpath}: {exc}")
            continue
        atomic_write_bytes(dest / f.relpath, data)
        report("downloaded", f.relpath)
    if failed:
        print(f"error: {len(failed)} file(s) could not be downloaded:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="get_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Default source folder here: {DEFAULT_SOURCE}",
    )
    parser.add_argument("--dest", metavar="DIR", type=Path, default=DEFAULT_DEST,
                        help="destination folder (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--from", dest="source", metavar="DIR", type=Path, default=None,
                      help="copy from this local folder with the same layout "
                           "(default: <repo root>/../shared/data if it exists)")
    mode.add_argument("--download", action="store_true",
                      help="download from the original public sources instead of copying")
    parser.add_argument("--only", metavar="NAME", action="append", choices=GROUPS,
                        help="restrict to this group (repeatable): " + ", ".join(GROUPS))
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=60.0,
                        help="--download: give up on a URL after this many seconds "
                             "(default: %(default)g)")
    parser.add_argument("--no-verify", action="store_true",
                        help="--download: keep files whose sha256 differs from the project's copy")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    files = selected_files(args.only)
    dest = args.dest.expanduser().resolve()
    try:
        if args.download:
            return download(dest, files, args.timeout, not args.no_verify, bool(args.only))
        source = args.source
        if source is None:
            if not DEFAULT_SOURCE.is_dir():
                print(f"error: no source folder: {DEFAULT_SOURCE} does not exist; "
                      "pass --from DIR or use --download", file=sys.stderr)
                return 1
            source = DEFAULT_SOURCE
        return copy_from(source.expanduser().resolve(), dest, files)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
