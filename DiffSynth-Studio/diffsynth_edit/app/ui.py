"""The gradio Blocks of the app: the editor page and the named API endpoint `/edit`.

Page: an image editor (upload, brush, eraser; the mask is the brush layer's alpha; the canvas keeps the image's
size), prompt, extra references, checkpoint picker (+ refresh), LoRA strength, extra LoRAs stacked on the checkpoint
(file + strength slots, from the same roots), sampler, steps, CFG, seed (+ random), blend α → edited image, sub image,
before/after slider, "use as input", the settings of the output.

API (`gradio_client`): `/edit` (image, mask, prompt, references, checkpoint, strength, sampler, steps, cfg, seed,
blend_alpha, loras, schedule) → (image, sub_image, settings) and `/checkpoints` () → list; `loras` is text,
`NAME[:STRENGTH]` entries separated by commas or new lines (names as `/checkpoints` lists them); `schedule` is
`qwen` (default) or `lightning` (the shift-3 flow sigmas Lightning LoRAs were distilled with). Both the page's Generate and `/edit` share
one concurrency group of size 1: one generation on the device at a time, the others wait in the queue and see their
position.
"""
from __future__ import annotations

import inspect
import os
import random
import traceback
from types import SimpleNamespace
from typing import Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from ..editing.editor import to_rgb  # noqa: E402
from .editor_limits import bounded_editor  # noqa: E402
from .errors import AppInputError  # noqa: E402
from .uploads import mask_from_editor  # noqa: E402
from .png import PngStore  # noqa: E402
from .service import LBM_MAX_STEPS, EditService  # noqa: E402

GPU_GROUP = "gpu"
HAS_IMAGE_SLIDER = hasattr(gr, "ImageSlider")
BRUSH_COLOR = "#ff2a6d"
QUEUE_POLL_S = 0.005


def _kw(fn: Callable, **kwargs) -> dict:
    """Keep only the keyword arguments `fn` accepts (gradio 5 and 6 differ in a few names)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _private() -> dict:
    params = inspect.signature(gr.Button.click).parameters
    if "api_visibility" in params:
        return {"api_visibility": "private"}
    return {"show_api": False}


def _undocumented(name: str) -> dict:
    """An event of the page that is left out of the API docs but callable by gradio_client under `name` (the tests
    drive the page's own generate / "use as input" path with it)."""
    params = inspect.signature(gr.Button.click).parameters
    if "api_visibility" in params:
        return {"api_visibility": "undocumented", "api_name": name}
    return {"show_api": False, "api_name": name}


def _user_error(e: BaseException) -> gr.Error:
    if isinstance(e, AppInputError):
        return gr.Error(str(e))
    traceback.print_exc()
    return gr.Error(f"internal error ({type(e).__name__}: {e}); the server keeps running")


def _before_image(image, max_pixels: int):
    """The "before" of the comparison as the service returns it (GenerateOutput.source) when it keeps the input's
    size; None when the service will downscale it, or cannot convert it (it then says why)."""
    if image.width * image.height > max_pixels:
        return None
    try:
        return to_rgb(image)
    except Exception:  # noqa: BLE001
        return None


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _status(settings: dict) -> str:
    parts = [f"**Done** in {settings.get('seconds', 0):.2f} s", f"seed {settings.get('seed')}",
             f"{settings.get('sampler')} × {settings.get('steps')}"
             + (" (Lightning schedule)" if settings.get("schedule") == "lightning" and settings.get("sampler") == "flow"
                else "")]
    if settings.get("checkpoint"):
        parts.append(f"`{settings['checkpoint']}` @ {settings.get('strength')}")
    for layer in settings.get("extra_loras") or []:
        parts.append(f"+ `{layer['name']}` @ {layer['strength']:g}")
    text = " · ".join(parts)
    notices = settings.get("notices") or []
    if notices:
        text += "\n\n" + "\n".join(f"- {n}" for n in notices)
    return text


def _slot_loras(values) -> list[tuple[str, float]]:
    """The page's extra-LoRA slots (files, then strengths) as (name, strength) pairs; empty slots left out."""
    half = len(values) // 2
    return [(f, s) for f, s in zip(values[:half], values[half:]) if isinstance(f, str) and f.strip()]


def build_ui(service: EditService, *, default_steps: int = 40, max_steps: int | None = None,
             default_cfg: float = 4.0, lbm_steps: int = 4, initial_checkpoint: str = "",
             title: str = "Qwen-Image-Edit: mask editing") -> gr.Blocks:
    """The page (inputs and settings, outputs, their events) and the hidden components and events of the API, in
    this order (gradio numbers the events in the order they are registered)."""
    max_steps = max_steps or service.max_steps
    store = PngStore()
    loaded = service.loaded
    initial_checkpoint = loaded[0] if loaded else initial_checkpoint
    page = SimpleNamespace()
    with gr.Blocks(**_kw(gr.Blocks, title=title, analytics_enabled=False)) as demo:
        gr.Markdown(f"## {title}\nUpload an image, paint the region to edit with the brush (white = edit; the eraser "
                    "removes paint; no paint = the whole image), write the instruction, pick a checkpoint, Generate.")
        for n in service.startup_notices:
            gr.Markdown(f"> ⚠️ {n}")
        with gr.Row():
            with gr.Column(scale=3):
                _input_components(page)
            with gr.Column(scale=2):
                _setting_components(page, service, initial_checkpoint, default_steps, max_steps, default_cfg)
        _output_components(page)
        api = _api_components(default_steps, default_cfg)
        _page_events(demo, page, service, store, default_steps, max_steps, default_cfg, lbm_steps)
        _api_events(api, service, store, default_steps, default_cfg)
    return demo


def _input_components(page: SimpleNamespace) -> None:
    editor = bounded_editor(gr.ImageEditor(**_kw(
        gr.ImageEditor, label="Image and mask", type="pil", image_mode="RGBA",
        sources=["upload", "clipboard"], transforms=(), layers=False, format="png",
        fixed_canvas=False, canvas_size=(1024, 1024), height=620, elem_id="edit-canvas",
        brush=gr.Brush(colors=[BRUSH_COLOR], default_color=BRUSH_COLOR, color_mode="fixed",
                       default_size=32),
        eraser=gr.Eraser(default_size=32))))
    prompt = gr.Textbox(label="Prompt (edit instruction)", lines=2, elem_id="prompt",
                        placeholder="e.g. replace the cup with a red teapot")
    references = gr.Gallery(**_kw(gr.Gallery, label="Extra reference images, in order (optional)",
                                  type="filepath", interactive=True, columns=4, height=150,
                                  file_types=["image"], elem_id="references"))
    vars(page).update(editor=editor, prompt=prompt, references=references)


def _setting_components(page: SimpleNamespace, service: EditService, initial_checkpoint: str, default_steps: int,
                        max_steps: int, default_cfg: float) -> None:
    with gr.Row():
        checkpoint = gr.Dropdown(choices=service.checkpoint_choices(), value=initial_checkpoint,
                                 label="Checkpoint (run · step)", allow_custom_value=True, scale=5,
                                 elem_id="checkpoint")
        refresh = gr.Button("↻ Refresh", scale=1, min_width=60, elem_id="refresh")
    strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
    extra_files, extra_strengths = [], []
    if service.max_extra_loras:
        with gr.Accordion(f"Extra LoRAs stacked on the checkpoint (up to {service.max_extra_loras}; "
                          "e.g. a Lightning LoRA: 4 steps, CFG 1)", open=False):
            for i in range(service.max_extra_loras):
                with gr.Row():
                    extra_files.append(gr.Dropdown(
                        choices=service.lora_choices(), value="", label=f"Extra LoRA {i + 1}",
                        allow_custom_value=True, scale=4, elem_id=f"extra-lora-{i + 1}"))
                    extra_strengths.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="strength",
                                                     scale=2, elem_id=f"extra-strength-{i + 1}"))
    sampler = gr.Radio([("Flow matching", "flow"), (f"LBM (1–{LBM_MAX_STEPS} steps)", "lbm")],
                       value="flow", label="Sampler")
    steps = gr.Slider(1, max_steps, value=default_steps, step=1, label="Steps")
    schedule = gr.Radio([("Qwen (dynamic shift)", "qwen"), ("Lightning (shift 3)", "lightning")],
                        value="qwen", label="Flow schedule (Lightning LoRAs: 4 steps, CFG 1)",
                        elem_id="schedule")
    cfg = gr.Slider(1.0, 10.0, value=default_cfg, step=0.1, label="CFG scale (1 = off)")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", scale=3, elem_id="seed")
        randomise = gr.Button("Random seed", scale=1, min_width=60, elem_id="random-seed")
    blend = gr.Slider(0.0, 1.0, value=0.0, step=0.05,
                      label="Background blend α (keeps the unmasked area; 0 = off)")
    generate = gr.Button("Generate", variant="primary", elem_id="generate")
    status = gr.Markdown(elem_id="status")
    vars(page).update(checkpoint=checkpoint, refresh=refresh, strength=strength, extra_files=extra_files,
                      extra_strengths=extra_strengths, sampler=sampler, steps=steps, schedule=schedule, cfg=cfg,
                      seed=seed, randomise=randomise, blend=blend, generate=generate, status=status)


def _output_components(page: SimpleNamespace) -> None:
    with gr.Row():
        out_image = gr.Image(label="Edited image", type="pil", format="png", interactive=False,
                             elem_id="output-image")
        out_sub = gr.Image(label="Sub image (bridge checkpoints: the edited box on white)", type="pil", format="png",
                           interactive=False, elem_id="output-sub")
    if HAS_IMAGE_SLIDER:
        compare = [gr.ImageSlider(**_kw(gr.ImageSlider, label="Before / after", type="pil", format="png",
                                        interactive=False, elem_id="compare", max_height=512))]
    else:
        with gr.Row():
            compare = [gr.Image(label="Before", type="pil", interactive=False),
                       gr.Image(label="After", type="pil", interactive=False)]
    use_as_input = gr.Button("⤴ Use as input (chain another edit)", elem_id="use-as-input")
    settings_json = gr.JSON(label="Settings that produced this output", elem_id="settings")
    vars(page).update(out_image=out_image, out_sub=out_sub, compare=compare, use_as_input=use_as_input,
                      settings_json=settings_json)


def _api_components(default_steps: int, default_cfg: float) -> SimpleNamespace:
    """The hidden inputs and outputs of `/edit` and `/checkpoints`."""
    api = SimpleNamespace()
    with gr.Column(visible=False):
        api_image = gr.File(label="image", type="filepath")
        api_mask = gr.File(label="mask", type="filepath")
        api_prompt = gr.Textbox(label="prompt", value="")
        api_refs = gr.File(label="references", file_count="multiple", type="filepath")
        api_ckpt = gr.Textbox(label="checkpoint", value="")
        api_strength = gr.Number(label="strength", value=1.0)
        api_sampler = gr.Textbox(label="sampler", value="flow")
        api_steps = gr.Number(label="steps", value=default_steps, precision=0)
        api_cfg = gr.Number(label="cfg", value=default_cfg)
        api_seed = gr.Number(label="seed", value=0, precision=0)
        api_blend = gr.Number(label="blend_alpha", value=0.0)
        api_loras = gr.Textbox(label="loras", value="")
        api_schedule = gr.Textbox(label="schedule", value="qwen")
        api_out_image = gr.Image(label="image", type="pil", format="png")
        api_out_sub = gr.Image(label="sub_image", type="pil", format="png")
        api_out_settings = gr.JSON(label="settings")
        api_ckpt_list = gr.JSON(label="checkpoints")
        api_trigger = gr.Button("api", visible=False)
        api_list_trigger = gr.Button("api-list", visible=False)
    vars(api).update(image=api_image, mask=api_mask, prompt=api_prompt, refs=api_refs, ckpt=api_ckpt,
                     strength=api_strength, sampler=api_sampler, steps=api_steps, cfg=api_cfg, seed=api_seed,
                     blend=api_blend, loras=api_loras, schedule=api_schedule, out_image=api_out_image,
                     out_sub=api_out_sub, out_settings=api_out_settings, ckpt_list=api_ckpt_list, trigger=api_trigger,
                     list_trigger=api_list_trigger)
    return api


def _page_events(demo: gr.Blocks, page: SimpleNamespace, service: EditService, store: PngStore, default_steps: int,
                 max_steps: int, default_cfg: float, lbm_steps: int) -> None:
    p = page  # the components, by name
    def ui_generate(editor_value, prompt_v, refs_v, ckpt_v, strength_v, sampler_v, steps_v, cfg_v, seed_v,
                    blend_v, schedule_v, progress=gr.Progress(), *extra_v):  # progress: gradio inserts it
        try:
            image, mask, notes = mask_from_editor(editor_value)
            if image is None:
                raise AppInputError("upload an image first (drop it on the editor)")
            progress(0, desc="encoding prompt and images")
            before = store.save_later(lambda: _before_image(image, service.max_upload_pixels), "before")

            def on_step(i: int, total: int) -> None:
                progress((i, total), desc="denoising", unit="steps")

            out = service.generate(image, mask, prompt_v, refs_v or None, ckpt_v, strength_v, sampler_v,
                                   steps_v, cfg_v, seed_v, blend_v, progress=on_step,
                                   mask_source="painted" if mask is not None else "none (whole image)",
                                   notices=notes, loras=_slot_loras(extra_v), schedule=schedule_v)
        except Exception as e:  # noqa: BLE001 - every failure becomes a message; the server keeps serving
            raise _user_error(e) from None
        image_path, sub_path = store.save(out.image, "image"), store.save(out.sub_image, "sub_image")
        try:
            source_path = before.result()
        except Exception:  # noqa: BLE001 - written again below
            source_path = None
        if source_path is None or _png_size(source_path) != out.source.size:  # the service resized the input
            source_path = store.save(out.source, "before")
        comparison = [(source_path, image_path)] if HAS_IMAGE_SLIDER else [source_path, image_path]
        return [image_path, sub_path, *comparison, out.settings, _status(out.settings)]

    p.generate.click(ui_generate,
                     inputs=[p.editor, p.prompt, p.references, p.checkpoint, p.strength, p.sampler, p.steps, p.cfg,
                             p.seed, p.blend, p.schedule, *p.extra_files, *p.extra_strengths],
                     outputs=[p.out_image, p.out_sub, *p.compare, p.settings_json, p.status],
                     concurrency_limit=1, concurrency_id=GPU_GROUP, **_undocumented("ui_generate"))

    def refresh_choices(current):
        choices = service.checkpoint_choices()
        values = {v for _, v in choices}
        return gr.update(choices=choices, value=current if current in values else "")

    p.refresh.click(refresh_choices, inputs=p.checkpoint, outputs=p.checkpoint, queue=False, **_private())
    demo.load(refresh_choices, inputs=p.checkpoint, outputs=p.checkpoint, queue=False, **_private())

    def refresh_lora_choices(*current):
        choices = service.lora_choices()
        values = {v for _, v in choices}
        updates = [gr.update(choices=choices, value=c if c in values else "") for c in current]
        return updates[0] if len(updates) == 1 else updates

    if p.extra_files:
        p.refresh.click(refresh_lora_choices, inputs=p.extra_files, outputs=p.extra_files, queue=False, **_private())
        demo.load(refresh_lora_choices, inputs=p.extra_files, outputs=p.extra_files, queue=False, **_private())
    p.randomise.click(lambda: random.randint(0, 2**31 - 1), outputs=p.seed, queue=False, **_private())

    def on_sampler(s, current_steps):
        if s == "lbm":
            v = int(current_steps or lbm_steps)
            return gr.update(maximum=LBM_MAX_STEPS, value=v if 1 <= v <= LBM_MAX_STEPS else lbm_steps), \
                gr.update(value=1.0)
        return gr.update(maximum=max_steps, value=default_steps), gr.update(value=default_cfg)

    p.sampler.change(on_sampler, inputs=[p.sampler, p.steps], outputs=[p.steps, p.cfg], queue=False, **_private())

    def use_output(image):
        if image is None:
            raise gr.Error("no output yet: generate first")
        return {"background": image, "layers": [], "composite": image}

    p.use_as_input.click(use_output, inputs=p.out_image, outputs=p.editor, queue=False,
                         **_undocumented("use_as_input"))


def _api_events(api: SimpleNamespace, service: EditService, store: PngStore, default_steps: int,
                default_cfg: float) -> None:
    a = api  # the hidden components, by name

    def api_edit(image, mask=None, prompt="", references=None, checkpoint="", strength=1.0, sampler="flow",
                 steps=default_steps, cfg=default_cfg, seed=0, blend_alpha=0.0, loras="", schedule="qwen",
                 progress=gr.Progress()):
        try:
            if image is None:
                raise AppInputError("no image given")

            def on_step(i: int, total: int) -> None:
                progress((i, total), desc="denoising", unit="steps")

            out = service.generate(image, mask, prompt, references or None, checkpoint, strength, sampler,
                                   steps, cfg, seed, blend_alpha, progress=on_step, loras=loras,
                                   schedule=schedule)
        except Exception as e:  # noqa: BLE001
            raise _user_error(e) from None
        return store.save(out.image, "image"), store.save(out.sub_image, "sub_image"), out.settings

    a.trigger.click(api_edit,
                    inputs=[a.image, a.mask, a.prompt, a.refs, a.ckpt, a.strength, a.sampler, a.steps, a.cfg, a.seed,
                            a.blend, a.loras, a.schedule],
                    outputs=[a.out_image, a.out_sub, a.out_settings], api_name="edit", preprocess=False,
                    **_kw(gr.Button.click, api_description="Edit an image (white mask = region to edit).",
                          concurrency_limit=1, concurrency_id=GPU_GROUP))

    def api_checkpoints():
        return [{"id": e.id, "run": e.run, "step": e.step, "variant": e.variant, "label": e.label}
                for e in service.checkpoints()]

    a.list_trigger.click(api_checkpoints, outputs=a.ckpt_list, api_name="checkpoints", queue=False)


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7999, share: bool = False,
           max_file_mb: int = 100, queue_size: int = 64, prevent_thread_lock: bool = False, quiet: bool = False,
           auth: list[tuple[str, str]] | None = None):
    demo.queue(**_kw(demo.queue, default_concurrency_limit=1, max_size=queue_size))
    # gradio's queue loop polls for new jobs every 1 ms, even when idle: 1000 GIL hand-offs a second, a ≈ 3 % tax on
    # Python-bound work in this process (the edit's launch loop included; measured on CPU). 5 ms: ≈ 0.6 %, and a new
    # job waits ≤ 5 ms longer to start.
    queue = getattr(demo, "_queue", None)
    if queue is not None and 0 < getattr(queue, "sleep_when_free", QUEUE_POLL_S) < QUEUE_POLL_S:
        queue.sleep_when_free = QUEUE_POLL_S
    return demo.launch(**_kw(demo.launch, server_name=host, server_port=port, share=share,
                             max_file_size=f"{max_file_mb}mb", show_error=True, ssr_mode=False,
                             prevent_thread_lock=prevent_thread_lock, quiet=quiet, inbrowser=False,
                             auth=auth or None))
