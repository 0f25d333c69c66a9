"""The page of the web front end: a side panel like the Slicer module's, the views beside it.

Widgets only: every button calls a method of ``UNet3DSegmentWebApp`` and every value lives in the
app's trame state (names listed in ``UNet3DSegmentWebApp._init_state``). Elements the browser test
drives carry ids (``load-demo``, ``upload``, ``segment``, ``cancel``, ``download``, ``segment-list``,
``run-state``, ``error``).
"""

from __future__ import annotations


from typing import Any

from trame.widgets import client, html
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from trame_vuetify.widgets import vuetify3 as v3

from ..base.options import Option

TITLE = "UNet3DSegment"
DRAWER_WIDTH = 380


def build_ui(app: Any) -> SinglePageWithDrawerLayout:
    """Build the page of ``app`` and return its layout (served as the app's main page)."""
    server = app.server
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text(TITLE)
        layout.drawer.width = DRAWER_WIDTH
        client.Style("html { overflow-y: hidden; } .u3-swatch { width: 14px; height: 14px; border-radius: 3px;"
                     " display: inline-block; margin-right: 8px; border: 1px solid #8886; }")
        with layout.toolbar:
            v3.VSpacer()
            html.Span("{{ volume_name }}", classes="text-body-2 mr-4")
        with layout.drawer:
            with html.Div(classes="pa-3 d-flex flex-column ga-3"):
                _input_section(app)
                _model_section(app)
                _advanced_section(app)
                _run_section(app)
                _messages()
                _segments_section(app)
        with layout.content:
            with html.Div(style="height: calc(100vh - 64px);"):
                app.layout_manager.initialize_layout_grid(layout)
    return layout


def _input_section(app: Any) -> None:
    upload = server_trigger(app, "u3_upload", app.upload)
    # Checked in the page too, so that an oversized file is refused before it is sent.
    too_big = ("`${f.name} is ${(f.size / 1048576).toFixed(0)} MB, over the ${max_upload_mb} MB upload limit; "
               "crop or compress it, or start the server with a higher --max-upload-mb`")
    # A statement list, not an arrow function: Vue would take "(() => ...)()" for the handler itself.
    on_change = (
        "const f = $event.target.files && $event.target.files[0];"
        f" if (f && f.size > max_upload_bytes) {{ error_message = {too_big}; }}"
        f" else if (f) {{ error_message = ''; info_message = `Uploading ${{f.name}}...`;"
        f" trigger('{upload}', [$event.target.files]); }}"
    )
    html.Div("Input volume", classes="text-subtitle-2")
    with html.Div(classes="d-flex ga-2 align-center"):
        v3.VFileInput(
            id="upload", label="Upload NRRD / NIfTI / MHA", __properties=["accept"], accept=".nrrd,.nii,.gz,.mha",
            prepend_icon="mdi-file-upload", density="compact", hide_details=True, disabled=("running || busy",),
            change=on_change,
        )
    v3.VBtn("Load demo MRI", id="load-demo", prepend_icon="mdi-brain", variant="tonal", block=True,
            click=app.load_demo, disabled=("running || busy",))


def _model_section(app: Any) -> None:
    html.Div("Model", classes="text-subtitle-2")
    # A choice list fixed at launch (bundled, --model, --models-dir): the page never names a server path.
    v3.VSelect(
        id="model", v_model=("model_path",), items=("model_items",), label="Model",
        hint="Models offered by this server (start it with --model or --models-dir to add yours)",
        persistent_hint=True, density="compact", disabled=("running || busy",),
    )
    html.Div("{{ card_title }}", classes="text-body-2 font-weight-bold", v_if="card_title")
    html.Div("{{ card_description }}", classes="text-caption", v_if="card_description")
    with html.Div(classes="d-flex flex-wrap ga-1", id="card-classes"):
        with v3.VChip(v_for="c in card_classes", key="c.name", size="small", variant="outlined"):
            html.Span(classes="u3-swatch", style=("{ background: c.color }",))
            html.Span("{{ c.name }}")
    v3.VAlert(text=("card_error",), v_if="card_error", type="warning", density="compact", variant="tonal")


def _advanced_section(app: Any) -> None:
    """One control per option of ``app.PAGE_OPTIONS``, made from its declaration (kind, choices, range)."""
    with v3.VExpansionPanels(variant="accordion"):
        with v3.VExpansionPanel(title="Advanced"):
            with v3.VExpansionPanelText():
                for declared in app.page_options():
                    option_control(declared)


def option_control(declared: Option) -> None:
    """The control of one option, bound to the state variable of the same name."""
    common = {"density": "compact", "hide_details": True, "disabled": ("running",)}
    label = declared.label or declared.title.capitalize()
    if declared.kind is bool:
        v3.VCheckbox(v_model=(declared.name,), label=label, **common)
    elif declared.choices:
        items = [{"title": declared.choice_label(c), "value": c} for c in declared.choices]
        v3.VSelect(v_model=(declared.name,), items=(items,), label=label, classes="my-2", **common)
    elif declared.kind is float:
        low, high = declared.panel_range()
        shown: Any = label
        if declared.auto_label:  # the lowest notch stands for None: say so in the label while it is there
            # Backtick strings: the expression sits in a double-quoted attribute and the text has an apostrophe.
            shown = (f"{declared.name} < {declared.minimum} ? `{label}: {declared.auto_label}` : `{label}`",)
        v3.VSlider(v_model=(declared.name,), label=shown, min=low, max=high, step=declared.step or 0.01,
                   thumb_label=True, **common)
    else:
        low, high = declared.panel_range()
        v3.VTextField(v_model_number=(declared.name,), label=label, type="number", min=low, max=high,
                      classes="my-2", **common)


def _run_section(app: Any) -> None:
    with html.Div(classes="d-flex ga-2"):
        v3.VBtn("Segment", id="segment", color="primary", prepend_icon="mdi-play", click=app.segment,
                disabled=("running || busy || !volume_name || !!card_error && !card_title",), classes="flex-grow-1")
        v3.VBtn("Cancel", id="cancel", prepend_icon="mdi-stop", click=app.cancel, disabled=("!running",))
    with v3.VProgressLinear(model_value=("progress",), height=22, color="primary", rounded=True,
                            v_show="running || progress > 0"):
        html.Span("{{ progress_text }}", classes="text-caption")
    html.Div("{{ status_text }}", classes="text-caption", v_show="running")
    html.Div("{{ run_state }}", id="run-state", style="display: none")


def _messages() -> None:
    v3.VAlert(text=("error_message",), id="error", v_if="error_message", type="error", density="compact",
              variant="tonal", closable=True, click_close="error_message = ''")
    v3.VAlert(text=("info_message",), id="info", v_if="info_message && !error_message", type="info",
              density="compact", variant="tonal")


def _segments_section(app: Any) -> None:
    download = server_trigger(app, "u3_download", app.download_segmentation)
    with html.Div(v_if="segments.length"):
        html.Div("Segments", classes="text-subtitle-2")
        with v3.VList(id="segment-list", density="compact"):
            with v3.VListItem(v_for="s in segments", key="s.id", classes="segment-item px-0"):
                with html.Div(classes="d-flex align-center"):
                    v3.VCheckboxBtn(
                        model_value=("s.visible",), density="compact", classes="flex-grow-0",
                        update_modelValue=(app.set_segment_visibility, "[s.id, $event]"),
                    )
                    html.Span(classes="u3-swatch", style=("{ background: s.color }",))
                    html.Span("{{ s.name }}", classes="segment-name")
                    html.Span("{{ s.volume_text }}", classes="segment-volume ml-auto text-caption")
        v3.VBtn("Download .seg.nrrd", id="download", prepend_icon="mdi-download", variant="tonal", block=True,
                click=f"utils.download(download_name, trigger('{download}'), 'application/octet-stream')")


def server_trigger(app: Any, name: str, method) -> str:
    """Register ``method`` under a fixed trigger name (called from client-side expressions)."""
    app.server.trigger(name)(method)
    return name
