"""``python -m corrvos.weights``: list and fetch the official checkpoints a user with internet access can get.

    python -m corrvos.weights list                  # what exists, and what is already in the cache
    python -m corrvos.weights fetch xmem stcn-corr  # download into the cache (resumable), then load strictly
    python -m corrvos.weights path xmem             # the cached file's path (for --checkpoint)

Files go to ``$CORRVOS_CACHE/weights`` (default ``~/.cache/corrvos/weights``), where the app finds them too.
A download is written to ``<file>.part`` (an interrupted one continues from there with an HTTP Range
request), checked by loading it strictly with :func:`corrvos.load_model` (the right architecture, every tensor),
and only then renamed into place: the cache never holds a partial or wrong file under a checkpoint's name.
Nothing in corrvos downloads on its own; only this command does, when asked.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from corrvos.cache import default_cache_dir
from corrvos.errors import CheckpointError, CorrvosError

_CHUNK = 1 << 20
_TIMEOUT_S = 30


class DownloadError(CorrvosError):
    """A checkpoint could not be downloaded (offline, server error, not a checkpoint)."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    name: str
    filename: str
    preset: str  # the architecture corrvos must recognise in the file (the strict-load check)
    description: str
    url: str | None = None  # a direct link, or
    release_api: str | None = None  # a GitHub release whose .pth asset is the file (its name is not documented)


OFFICIAL: dict[str, OfficialCheckpoint] = {c.name: c for c in (
    OfficialCheckpoint("xmem", "XMem.pth", "xmem", "XMem (ECCV 2022), static + main training (s03), release v1.0",
                       url="https://github.com/hkchengrex/XMem/releases/download/v1.0/XMem.pth"),
    OfficialCheckpoint("xmem-s012", "XMem-s012.pth", "xmem", "XMem with BL30K pretraining (s012), release v1.0",
                       url="https://github.com/hkchengrex/XMem/releases/download/v1.0/XMem-s012.pth"),
    OfficialCheckpoint("stcn", "stcn.pth", "stcn", "STCN (NeurIPS 2021), s012 model of its download_model.py",
                       url="https://drive.usercontent.google.com/download?id=1mRrE0uCI2ktdWlUgapJI_KmgeIiF2eOm"
                           "&export=download&confirm=t"),
    OfficialCheckpoint("stcn-corr", "stcn_correspondence_cvpr2023.pth", "stcn-corr",
                       "STCN + correspondence losses, the CVPR 2023 paper's release (tag CKPT)",
                       release_api="https://api.github.com/repos/wenguanwang/VOS_Correspondence/releases/tags/CKPT"),
)}


def weights_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "weights"


def cached_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file of official checkpoint ``name``, None when it has not been fetched."""
    path = weights_dir(cache_dir) / _entry(name).filename
    return path if path.is_file() else None


def _entry(name: str) -> OfficialCheckpoint:
    try:
        return OFFICIAL[name]
    except KeyError:
        raise DownloadError(f"There is no official checkpoint called {name!r}; choose one of "
                            f"{', '.join(OFFICIAL)} (python -m corrvos.weights list).") from None


def _open(url: str, headers: dict[str, str] | None = None, complete_ok: bool = False):
    """The response of ``url``; with ``complete_ok``, None for 416 (the partial file already holds everything)."""
    request = urllib.request.Request(url, headers={"User-Agent": "corrvos", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)  # noqa: S310 (http(s) URLs of our own table)
    except urllib.error.HTTPError as err:
        if complete_ok and err.code == 416:
            return None
        raise DownloadError(f"{urlparse(url).netloc} answered {err.code} {err.reason} for {url}; the file may have "
                            "moved: download it by hand and put it in the cache folder.") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"Cannot reach {urlparse(url).netloc} ({reason}): this machine seems to be offline; "
                            f"download {url} elsewhere and copy it into {weights_dir()}.") from None


def resolve_url(entry: OfficialCheckpoint, url: str | None = None) -> str:
    """The file's download link: ``url`` if given, the entry's link, or the .pth asset of its GitHub release."""
    if url or entry.url:
        return url or entry.url  # type: ignore[return-value]
    with _open(entry.release_api, {"Accept": "application/vnd.github+json"}) as response:
        try:
            release = json.load(response)
        except ValueError:
            raise DownloadError(f"{entry.release_api} did not answer with a release description (JSON).") from None
    assets = [a for a in release.get("assets", []) if str(a.get("name", "")).endswith((".pth", ".pt"))]
    if not assets:
        raise DownloadError(f"The release at {entry.release_api} lists no .pth file; download the checkpoint by hand.")
    return max(assets, key=lambda a: a.get("size", 0))["browser_download_url"]


def fetch(name: str, cache_dir: str | os.PathLike | None = None, url: str | None = None, progress: bool = True,
          force: bool = False) -> Path:
    """Download official checkpoint ``name`` into the cache (resuming a partial download) and check it loads."""
    entry = _entry(name)
    folder = weights_dir(cache_dir)
    final = folder / entry.filename
    if final.is_file() and not force:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    link = resolve_url(entry, url)
    part = final.with_name(final.name + ".part")
    _download(link, part, entry.filename, progress)
    check_file(part, entry)
    os.replace(part, final)
    return final


def _download(link: str, part: Path, label: str, progress: bool) -> None:
    """Append the rest of ``link`` to ``part`` (a Range request when part holds a beginning already)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.is_file() else 0
    response = _open(link, {"Range": f"bytes={have}-"} if have else None, complete_ok=bool(have))
    if response is None:  # 416: the partial file already holds the whole file
        return
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        if "text/html" in response.headers.get("Content-Type", ""):
            raise DownloadError(f"{urlparse(link).netloc} sent a web page instead of {label} (a login or quota "
                                f"page?); open {link} in a browser and put the file in {part.parent}.")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        try:
            with open(part, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DownloadError(f"The download of {label} broke off ({err}); run the same command again to "
                                "continue it.") from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"The download of {label} stopped at {part.stat().st_size} of {total} bytes; "
                            "run the same command again to continue it.")


def check_file(path: Path, entry: OfficialCheckpoint) -> None:
    """Strict load of a downloaded file as ``entry.preset``; a file that fails is removed, with one sentence."""
    from corrvos.models.checkpoint import load_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the dropped key_proj2 of the paper's file: expected here
            model = load_model(path)
    except CheckpointError as err:
        path.unlink(missing_ok=True)
        raise DownloadError(f"The downloaded {entry.filename} is not a usable checkpoint ({err}); it was removed, "
                            "so the next fetch starts afresh.") from None
    if model.config.name != entry.preset:
        path.unlink(missing_ok=True)
        raise DownloadError(f"The downloaded {entry.filename} holds a {model.config.name} network, not "
                            f"{entry.preset}; it was removed.")


def _list(cache_dir: Path | None) -> None:
    for entry in OFFICIAL.values():
        path = cached_path(entry.name, cache_dir)
        state = f"cached: {path}" if path else "not fetched"
        print(f"{entry.name:<10} {entry.description} [{state}]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corrvos.weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, help="folder of the files (default $CORRVOS_CACHE/weights)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the official checkpoints and whether they are cached")
    f = sub.add_parser("fetch", help="download checkpoints into the cache and check that they load")
    f.add_argument("names", nargs="+", choices=list(OFFICIAL))
    f.add_argument("--url", help="download from this address instead (a mirror; one name only)")
    f.add_argument("--force", action="store_true", help="download again even when cached")
    f.add_argument("--no-progress", dest="progress", action="store_false")
    w = sub.add_parser("path", help="print the cached file's path")
    w.add_argument("name", choices=list(OFFICIAL))
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            _list(args.cache)
        elif args.command == "path":
            path = cached_path(args.name, args.cache)
            if path is None:
                raise DownloadError(f"{args.name} is not in the cache; run python -m corrvos.weights fetch {args.name}.")
            print(path)
        else:
            if args.url and len(args.names) > 1:
                raise DownloadError("--url names one file: fetch one checkpoint at a time with it.")
            for name in args.names:
                print(fetch(name, args.cache, args.url, args.progress, args.force))
    except CorrvosError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
