"""Everything a bundle's text side is made of, loaded once and the same way for the
runtime (``Pipeline``), for the text golden written at compile time and for ``verify``
rerunning it: the chat template and tokenizer, the stop tokens, the vision placeholder ids
(``config.json``, else the tokenizer) and the image processor's settings (the manifest's
``processor``). Files are read only through :class:`~qwen3vl_compile.bundle.manifest.BundleFiles`."""

from __future__ import annotations

import dataclasses
import json

from ..errors import BundleError
from .chat import ChatFormatter
from ..processor_config import ProcessorConfig


@dataclasses.dataclass
class TextSide:
    chat: ChatFormatter
    processor: ProcessorConfig
    config: dict
    image_token_id: int
    video_token_id: int
    merge: int

    @classmethod
    def load(cls, files, processor: dict) -> "TextSide":
        """``files``: a bundle's BundleFiles; ``processor``: its manifest's ``processor``."""
        path = files.path("config.json")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise BundleError(f"{path}: not a JSON object")
        chat = ChatFormatter(files)
        # The bundle's config.json names the vision tokens; else its tokenizer does.
        image = config.get("image_token_id") or chat.tokenizer.token_to_id("<|image_pad|>")
        video = config.get("video_token_id") or chat.tokenizer.token_to_id("<|video_pad|>")
        vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
        return cls(chat, ProcessorConfig.from_dict(processor or {}), config, image, video,
                   vision.get("spatial_merge_size", 2))
