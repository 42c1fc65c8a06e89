"""``python -m corrvos.weights`` against a local HTTP server on 127.0.0.1 (nothing is downloaded from outside)."""
import http.server
import json
import socket
import threading

import pytest
import torch

from corrvos import weights
from corrvos.models.checkpoint import build_model


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    torch.manual_seed(0)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in build_model("stcn-s").state_dict().items()}
    path = tmp_path_factory.mktemp("src") / "tiny.pth"
    torch.save(sd, path)
    return path.read_bytes()


class _Server:
    """Serves ``files`` (path -> (bytes, content type)); honours Range; ``truncate`` cuts a body short once."""

    def __init__(self, files):
        self.files, self.requests, self.truncate = files, [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if self.path not in server.files:
                    self.send_error(404)
                    return
                body, kind = server.files[self.path]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                else:
                    self.send_response(200)
                rest = body[start:]
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                cut = server.truncate.pop(self.path, None)
                self.wfile.write(rest[:cut] if cut is not None else rest)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(checkpoint_bytes, monkeypatch):
    s = _Server({"/tiny.pth": (checkpoint_bytes, "application/octet-stream")})
    monkeypatch.setitem(weights.OFFICIAL, "tiny", weights.OfficialCheckpoint(
        "tiny", "tiny.pth", "stcn-s", "a small STCN for the tests", url=f"{s.url}/tiny.pth"))
    yield s
    s.close()


def test_fetch_downloads_checks_and_caches(server, tmp_path, checkpoint_bytes):
    path = weights.fetch("tiny", tmp_path, progress=False)
    assert path == tmp_path / "tiny.pth" and path.read_bytes() == checkpoint_bytes
    assert not (tmp_path / "tiny.pth.part").exists()
    assert weights.cached_path("tiny", tmp_path) == path
    asked = len(server.requests)
    assert weights.fetch("tiny", tmp_path, progress=False) == path
    assert len(server.requests) == asked  # cached: no second download


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path, checkpoint_bytes):
    server.truncate["/tiny.pth"] = len(checkpoint_bytes) // 3
    with pytest.raises(weights.DownloadError, match="run the same command again"):
        weights.fetch("tiny", tmp_path, progress=False)
    part = tmp_path / "tiny.pth.part"
    assert part.is_file() and not (tmp_path / "tiny.pth").exists()
    have = part.stat().st_size
    assert 0 < have < len(checkpoint_bytes)
    path = weights.fetch("tiny", tmp_path, progress=False)
    assert server.requests[-1] == ("/tiny.pth", f"bytes={have}-")
    assert path.read_bytes() == checkpoint_bytes


def test_a_complete_partial_file_is_finished_without_downloading(server, tmp_path, checkpoint_bytes):
    (tmp_path / "tiny.pth.part").write_bytes(checkpoint_bytes)  # killed between the last byte and the rename
    assert weights.fetch("tiny", tmp_path, progress=False).read_bytes() == checkpoint_bytes


def test_release_api_picks_the_pth_asset(server, tmp_path, checkpoint_bytes, monkeypatch):
    release = {"assets": [{"name": "log.txt", "size": 10, "browser_download_url": f"{server.url}/log.txt"},
                          {"name": "model.pth", "size": len(checkpoint_bytes),
                           "browser_download_url": f"{server.url}/tiny.pth"}]}
    server.files["/release"] = (json.dumps(release).encode(), "application/json")
    monkeypatch.setitem(weights.OFFICIAL, "tiny", weights.OfficialCheckpoint(
        "tiny", "tiny.pth", "stcn-s", "from a release", release_api=f"{server.url}/release"))
    assert weights.fetch("tiny", tmp_path, progress=False).read_bytes() == checkpoint_bytes


@pytest.mark.parametrize("body,kind,message", [
    (b"\x00" * 1000, "application/octet-stream", "is not a usable checkpoint"),
    (b"<html>sign in</html>", "text/html; charset=utf-8", "sent a web page"),
])
def test_wrong_content_leaves_nothing_under_the_name(server, tmp_path, body, kind, message):
    server.files["/tiny.pth"] = (body, kind)
    with pytest.raises(weights.DownloadError, match=message):
        weights.fetch("tiny", tmp_path, progress=False)
    assert not (tmp_path / "tiny.pth").exists()


def test_a_file_of_another_architecture_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.setitem(weights.OFFICIAL, "tiny", weights.OfficialCheckpoint(
        "tiny", "tiny.pth", "xmem", "says XMem, holds STCN", url=f"{server.url}/tiny.pth"))
    with pytest.raises(weights.DownloadError, match="holds a stcn-s network, not xmem"):
        weights.fetch("tiny", tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_offline_and_missing_files_are_one_sentence(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(weights.DownloadError, match="seems to be offline"):
        weights.fetch("tiny", tmp_path, url=f"http://127.0.0.1:{closed}/tiny.pth", progress=False)
    with pytest.raises(weights.DownloadError, match="answered 404"):
        weights.fetch("tiny", tmp_path, url=f"{server.url}/gone.pth", progress=False)


def test_cli_list_fetch_path(server, tmp_path, capsys):
    assert weights.main(["--cache", str(tmp_path), "fetch", "tiny", "--no-progress"]) == 0
    assert weights.main(["--cache", str(tmp_path), "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "tiny.pth")
    assert weights.main(["--cache", str(tmp_path), "list"]) == 0
    listing = capsys.readouterr().out
    assert "cached:" in listing and "xmem" in listing and "stcn-corr" in listing
    assert weights.main(["--cache", str(tmp_path / "empty"), "path", "xmem"]) == 2
    assert "not in the cache" in capsys.readouterr().err


def test_the_official_table_names_known_architectures():
    from corrvos.models.config import PRESETS

    assert {"xmem", "xmem-s012", "stcn", "stcn-corr"} <= set(weights.OFFICIAL)
    assert all(e.preset in PRESETS and (e.url or e.release_api) for e in weights.OFFICIAL.values())
