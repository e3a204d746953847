"""Chat messages with image parts: which images, in order, and the prompt text with one
placeholder per image where the chat template puts it.

OpenAI's content parts (``{"type": "image_url", "image_url": {"url": ...}}``, and vLLM's
``{"type": "image_pil", "image_pil": PIL.Image}`` in Python) become transformers' ``{"type":
"image"}`` parts. Templates of vision models loop over the parts and write the model's
placeholder for each image; a template that prints the content as one string gets the
placeholders before the message's text instead, one a line, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

IMAGE_PART_TYPES = ("image_url", "image_pil")


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages whose image parts are ``{"type": "image"}``, each image part's source in
    order: the URL string, or the PIL image). Messages without parts come back as they are."""
    shaped, sources = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            shaped.append(message)
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "image_url":
                image_url = part["image_url"]
                sources.append(image_url["url"] if isinstance(image_url, dict) else image_url)
                parts.append({"type": "image"})
            elif kind == "image_pil":
                sources.append(part["image_pil"])
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise ValueError(f"content part type {kind!r} is not supported: use text, "
                                 f"{', '.join(IMAGE_PART_TYPES)}")
        shaped.append({**message, "content": parts})
    return shaped, sources


def as_strings(messages: list[dict[str, Any]], placeholder: str) -> list[dict[str, Any]]:
    """Parts joined into one string per message: a placeholder line per image, then the text."""
    flat = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images = [placeholder for part in content if part["type"] == "image"]
            texts = [part["text"] for part in content if part["type"] == "text"]
            message = {**message, "content": "\n".join(images + texts)}
        flat.append(message)
    return flat


def render_with_images(render: Callable[[list[dict[str, Any]]], str], messages: list[dict[str, Any]],
                       num_images: int, placeholder: str) -> str:
    """The prompt text with exactly one ``placeholder`` per image: through the template's own
    handling of image parts when it has one, else with the parts joined into strings."""
    text: Optional[str] = None
    if num_images:
        try:
            text = render(messages)
        except Exception:  # noqa: BLE001  (a template that reads content as a string may fail on parts)
            text = None
        if text is not None and text.count(placeholder) == num_images:
            return text
    return render(as_strings(messages, placeholder))
