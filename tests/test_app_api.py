"""The app's API through gradio_client against `python -m app` started in a subprocess on a free port."""
from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest

from app_fixtures import SIZE, make_checkpoints, make_clip, start_app, stop_app

N_FRAMES = 5


@pytest.fixture(scope="module")
def server(davis2016_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("app_api")
    video, mask, gt = make_clip(davis2016_root, root / "clip", N_FRAMES)
    make_checkpoints(root / "checkpoints")
    log = root / "server.log"
    proc, url = start_app(root / "checkpoints", log)
    yield {"url": url, "video": video, "mask": mask, "gt": gt, "log": log}
    stop_app(proc)


def test_api_upload_propagate_click_export(server):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False)
    api = client.view_api(print_info=False, return_format="dict")
    named = set(api["named_endpoints"])
    assert {"/load_video", "/propagate", "/affinity_at", "/export", "/show_frame", "/edit_frame", "/correct"} <= named

    _, slider, info = client.predict(handle_file(str(server["video"])), api_name="/load_video")
    assert f"{N_FRAMES} frames" in info

    start = time.perf_counter()
    job = client.submit(
        None, handle_file(str(server["mask"])), 0, "stcn-s_baseline.safetensors", "stcn-s_corr.safetensors",
        [handle_file(str(p)) for p in sorted(server["gt"].glob("*.png"))],
        api_name="/propagate",
    )
    result = job.result(timeout=300)
    print(f"API propagate A+B, {N_FRAMES} frames {SIZE[0]}x{SIZE[1]}: {time.perf_counter() - start:.2f} s")
    view_a, view_b, diff, status, frame, video_a, video_b, chart = result
    assert "Done" in status, status
    video_a = video_a["video"] if isinstance(video_a, dict) else video_a
    assert Path(video_a).suffix == ".mp4" and Path(video_a).stat().st_size > 0
    assert frame["maximum"] == N_FRAMES - 1 and frame["value"] == 0

    start = time.perf_counter()
    gallery_a, gallery_b, strip, readout = client.predict(3, 80, 50, api_name="/affinity_at")
    print(f"API click twin: {time.perf_counter() - start:.2f} s")
    assert len(gallery_a) >= 1 and len(gallery_b) >= 1
    assert "Entropy" in readout and "A: stcn-s_baseline" in readout and "B: stcn-s_corr" in readout
    assert Path(strip).is_file()

    exported = client.predict(api_name="/export")
    with zipfile.ZipFile(exported) as zf:
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
        mattes = [n for n in pngs if "_mattes/" in n]
        assert len(pngs) - len(mattes) == 2 * N_FRAMES  # a palette PNG per frame and model
        assert len(mattes) == 2 * 2 * N_FRAMES  # and a hard and a soft matte per frame, model and (here one) object

    # A correction through the API: frame 3 into the editor, then its ground truth as the corrected layer.
    editor, status = client.predict(3, "B", api_name="/edit_frame")
    assert "Frame 3 is in the editor" in status
    from PIL import Image

    from app.inputs import label_layer
    from corrvos.io.masks import read_mask

    layer = server["video"].parent / "layer3.png"
    Image.fromarray(label_layer(read_mask(server["gt"] / "00003.png"), 1)).save(layer)
    assert len(editor["layers"]) == 5  # B's masks on the object layers (all five sent, as the browser does)
    fixed = {"background": handle_file(editor["background"]), "layers": [handle_file(str(layer))], "composite": None}
    result = client.submit(fixed, api_name="/correct").result(timeout=300)
    assert f"Done: 1 of {N_FRAMES} frames propagated from frame 3" in result[3], result[3]
    assert "corrected frame(s) 3" in result[3]


def test_api_errors_are_messages_and_server_survives(server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server["url"], verbose=False)  # a fresh session: nothing loaded yet
    with pytest.raises(AppError, match="(?i)no video is loaded"):
        client.predict(1, 10, 10, api_name="/affinity_at")
    with pytest.raises(AppError, match="(?i)no video is loaded"):
        client.predict(None, handle_file(str(server["mask"])), 0, "stcn-s_baseline.safetensors",
                       "stcn-s_corr.safetensors", None, api_name="/propagate")
    _, _, info = client.predict(handle_file(str(server["video"])), api_name="/load_video")
    assert "frames" in info
