"""Layout of the app and the wiring of its events (no logic: everything is an AppHandlers method)."""
from __future__ import annotations

import gradio as gr

from app.handlers import AppHandlers
from app.session import MAX_OBJECTS, AppConfig, list_examples
from corrvos.io.masks import PALETTE
from corrvos.viz.compare import DISAGREE_A_RGB, DISAGREE_B_RGB, DISAGREE_BOTH_RGB

VIDEO_TYPES = [".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".zip"]

INTRO = """# corrvos: compare two VOS checkpoints and inspect their memory matching
1. Upload a video (mp4, webm, mov, avi) or a zip of frames, or load the bundled example.
2. Mark each object on its own layer (obj1, obj2, … in the editor's layer list) on the annotated frame, or upload a mask PNG.
3. Propagate with checkpoints **A** (baseline) and **B** (correspondence-trained): forward and backward from the annotated frame.
4. Scrub the frames, then **click a pixel** of A, B or the disagreement view to see where each model's memory read sent it.
5. A frame went wrong? **Correct this frame** loads it into the editor with a model's masks; fix them (or add an object on a free layer) and re-propagate from there.
"""


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb))


def build_demo(config: AppConfig | None = None) -> gr.Blocks:
    """The app as a ``gr.Blocks``; ``launch`` it (``python -m app`` does)."""
    h = AppHandlers(config)
    names, default_a, default_b = h.checkpoint_choices()
    examples = list_examples()
    gpu = dict(concurrency_id="gpu", concurrency_limit=1)
    legend = (
        f"<span style='color:{_hex(DISAGREE_A_RGB)}'>■</span> only A · "
        f"<span style='color:{_hex(DISAGREE_B_RGB)}'>■</span> only B · "
        f"<span style='color:{_hex(DISAGREE_BOTH_RGB)}'>■</span> different objects"
    )

    with gr.Blocks(title="corrvos", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(h.header(), elem_id="header")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Tab("Upload"):
                    upload = gr.File(label="Video or zip of frames", file_types=VIDEO_TYPES, elem_id="upload")
                with gr.Tab("Example"):
                    example = gr.Dropdown(examples, value=examples[0] if examples else None, label="Bundled example")
                    load_example = gr.Button("Load example", elem_id="load-example")
                    gr.Markdown("blackswan: DAVIS 2016 (Perazzi et al., CVPR 2016), CC BY-NC 4.0; see app/examples/README.md.")
                input_info = gr.Markdown("No video loaded.", elem_id="input-info")
                anno_t = gr.Slider(0, 1, value=0, step=1, label="Annotated frame (propagation runs forward and backward from it)",
                                   interactive=False, elem_id="anno-t")
                with gr.Row():
                    ckpt_a = gr.Dropdown(names, value=default_a, label="Checkpoint A (baseline)", elem_id="ckpt-a", scale=4,
                                         info="any .safetensors or upstream .pth in the checkpoints folder")
                    ckpt_b = gr.Dropdown(names, value=default_b, label="Checkpoint B (correspondence)", elem_id="ckpt-b", scale=4,
                                         info="compared with A on the same frames and annotation")
                    refresh = gr.Button("↻", scale=1, min_width=40)
                ckpt_msg = gr.Markdown(h.checkpoint_message(default_a, default_b), elem_id="ckpt-msg")
                with gr.Accordion("Mask PNG and ground truth (optional)", open=False):
                    mask_file = gr.File(label="Mask PNG for the annotated frame (replaces the drawing)", file_types=[".png"])
                    gt_files = gr.File(label="Ground-truth masks (PNGs or a zip) for J per frame", file_count="multiple",
                                       file_types=[".png", ".zip"])
                with gr.Row():
                    run = gr.Button("Propagate A and B", variant="primary", elem_id="propagate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("", elem_id="status")
            with gr.Column(scale=2):
                editor = gr.ImageEditor(
                    label="Annotated frame: one layer per object",
                    type="numpy", image_mode="RGB", sources=(), transforms=(), format="png",
                    layers=gr.LayerOptions(layers=[f"obj{k}" for k in range(1, MAX_OBJECTS + 1)], allow_additional_layers=False),
                    brush=gr.Brush(colors=[_hex(PALETTE[k]) for k in range(1, MAX_OBJECTS + 1)], color_mode="fixed", default_size=20),
                    canvas_size=(854, 480), elem_id="editor",
                )

        gr.Markdown("## Results")
        frame = gr.Slider(0, 1, value=0, step=1, label="Frame", elem_id="frame")
        with gr.Row():
            view_a = gr.Image(label="A", interactive=False, elem_id="view-a", format="jpeg")
            view_b = gr.Image(label="B", interactive=False, elem_id="view-b", format="jpeg")
            with gr.Column():
                view_diff = gr.Image(label="Where A and B differ", interactive=False, elem_id="view-diff", format="jpeg")
                gr.HTML(legend)
        with gr.Row():
            fix_from = gr.Radio(["A", "B"], value="B", label="Correct starting from the masks of", elem_id="fix-from",
                                info="both models then get the same corrected mask; a new layer adds an object")
            fix = gr.Button("Correct this frame (loads it into the editor above)", elem_id="fix")
            refix = gr.Button("Re-propagate from the correction", variant="primary", elem_id="repropagate")
        with gr.Row():
            video_a = gr.Video(label="Overlay video A", interactive=False, height=300)
            video_b = gr.Video(label="Overlay video B", interactive=False, height=300)
        chart = gr.Plot(label="Per frame")

        gr.Markdown("## Affinity: click a pixel of A, B or the difference view")
        with gr.Row():
            qx = gr.Number(label="x", precision=0, elem_id="qx")
            qy = gr.Number(label="y", precision=0, elem_id="qy")
            inspect = gr.Button("Inspect (x, y)", elem_id="inspect")
        gallery = dict(columns=4, height=300, format="jpeg", preview=False, allow_preview=True, object_fit="contain",
                       fit_columns=False)
        gallery_a = gr.Gallery(label="A: memory frames (heatmap of the clicked pixel's read weights, top matches numbered)",
                               elem_id="gallery-a", **gallery)
        gallery_b = gr.Gallery(label="B: memory frames", elem_id="gallery-b", **gallery)
        strip = gr.Image(label="Clicked pixel → top matches (A above, B below)", interactive=False, format="jpeg", elem_id="strip")
        readout = gr.Markdown(elem_id="readout")

        gr.Markdown("## Export")
        with gr.Row():
            export = gr.Button("Export masks (palette PNGs, per-object hard and soft mattes per model) and overlay videos", elem_id="export")
            export_file = gr.File(label="Download", interactive=False, elem_id="export-file")

        # ----------------------------------------------------------------------------------- events
        input_outputs = [editor, anno_t, input_info]
        upload.upload(h.load_video, [upload], input_outputs, api_name="load_video")
        load_example.click(h.load_example, [example], input_outputs, api_name="load_example")
        anno_t.release(h.set_anno_frame, [anno_t], [editor], api_name="set_anno_frame")
        refresh.click(h.refresh_checkpoints, None, [ckpt_a, ckpt_b, ckpt_msg], api_visibility="private")
        demo.load(h.refresh_checkpoints, None, [ckpt_a, ckpt_b, ckpt_msg], api_visibility="private")
        for dropdown in (ckpt_a, ckpt_b):
            dropdown.change(h.checkpoint_message, [ckpt_a, ckpt_b], [ckpt_msg], api_visibility="private",
                            show_progress="hidden")

        prop = run.click(
            h.propagate, [editor, mask_file, anno_t, ckpt_a, ckpt_b, gt_files],
            [view_a, view_b, view_diff, status, frame, video_a, video_b, chart],
            api_name="propagate", show_progress="minimal", **gpu,
        )
        fix.click(h.edit_frame, [frame, fix_from], [editor, status], api_name="edit_frame")
        reprop = refix.click(
            h.correct, [editor], [view_a, view_b, view_diff, status, frame, video_a, video_b, chart],
            api_name="correct", show_progress="minimal", **gpu,
        )
        stop.click(None, None, None, cancels=[prop, reprop])
        frame.change(h.show_frame, [frame], [view_a, view_b, view_diff], trigger_mode="always_last",
                     api_name="show_frame", show_progress="hidden")

        click_outputs = [gallery_a, gallery_b, strip, readout]
        for view in (view_a, view_b, view_diff):
            view.select(h.click, [frame], [*click_outputs, qx, qy], trigger_mode="always_last", api_visibility="private")
        inspect.click(h.affinity_at, [frame, qx, qy], click_outputs, api_name="affinity_at")
        export.click(h.export, None, [export_file], api_name="export")
    demo.queue(max_size=16, default_concurrency_limit=4)
    return demo
