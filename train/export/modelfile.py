"""An Ollama Modelfile next to each GGUF, so that `ollama create NAME -f Modelfile.TYPE` works on the export.

Ollama does not run the tokenizer's Jinja chat template; it needs its own Go template. There is no
general Jinja -> Go translator, so the template is recognised by family (the markers each family's
template writes) and the Go template Ollama's own library uses for that family is written. An
unrecognised template is left out with a note: Ollama then sends the prompt as it is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# family: (markers that identify the Jinja template, Ollama Go template, stop strings)
FAMILIES: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "chatml": (("<|im_start|>", "<|im_end|>"),
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n",
               ("<|im_end|>",)),
    "llama3": (("<|start_header_id|>", "<|eot_id|>"),
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
               "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|eot_id|>",)),
}


def chat_template(export_dir: Path) -> str | None:
    """The chat template the export's tokenizer files carry, if any."""
    for name, key in (("tokenizer_config.json", "chat_template"),):
        path = export_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, str):
                return value
    jinja = export_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def family(template: str | None) -> str | None:
    if not template:
        return None
    for name, (markers, _, _) in FAMILIES.items():
        if all(m in template for m in markers):
            return name
    return None


def modelfile_text(gguf_file: str, template: str | None) -> tuple[str, dict[str, Any]]:
    """The Modelfile and what it says about the template."""
    lines = [f"FROM ./{gguf_file}"]
    name = family(template)
    if name is not None:
        _, go_template, stops = FAMILIES[name]
        lines.append(f'TEMPLATE """{go_template}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
        info: dict[str, Any] = {"chat_template": name}
    else:
        note = ("no chat template in the tokenizer" if not template else
                "the tokenizer's chat template is not one of the known families "
                f"({', '.join(FAMILIES)}): no TEMPLATE written, add one by hand for chat use")
        lines.insert(0, f"# {note}")
        info = {"chat_template": None, "note": note}
    return "\n".join(lines) + "\n", info


def write_modelfile(export_dir: Path, gguf_file: str, kind: str) -> str:
    """Write EXPORT/Modelfile.KIND for model-KIND.gguf; returns its name."""
    text, _ = modelfile_text(gguf_file, chat_template(export_dir))
    name = f"Modelfile.{kind}"
    (export_dir / name).write_text(text)
    return name
