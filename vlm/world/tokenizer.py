"""A real Hugging Face tokenizer and processor for the world's model.

The tokenizer is word-level (one token per lower-cased word or punctuation
mark) built with the ``tokenizers`` library and wrapped as a fast tokenizer,
so it round-trips through ``save_pretrained`` / ``AutoTokenizer`` and gives
character offsets. The processor is a stock ``LlavaProcessor`` with a PIL
CLIP image processor and the LLaVA-1.5 chat template (a world trained in
Qwen2-VL: Qwen2-VL's image processor, see ``build_processor``).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .render import IMAGE_SIZE

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]
CHAT_WORDS = ["user", "assistant", ":", "?", ",", "."]

# The chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{q} ASSISTANT:".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_tokenizer(words: set[str]) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the world's words and the chat template's special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in CHAT_WORDS + sorted(words - set(CHAT_WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[?:,.!]"), behavior="isolated"),
        ]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=256,
        padding_side="right",
    )


def build_processor(words: set[str], patch_size: int, family: str = "llava"):
    """The world's processor: its tokenizer and the LLaVA-1.5 chat template with the family's image processor —
    for LLaVA a ``LlavaProcessor`` with a CLIP image processor; for Qwen2-VL an ``ImageTextProcessor`` (the
    stand-in for Qwen2-VL's processor, which transformers cannot build without torchvision) with a Qwen2-VL
    image processor fixed at 64×64 pixels: 2×2 merged patches of ``patch_size / 2``, as many image tokens as
    LLaVA's."""
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from ..architecture import QWEN2_VL
        from ..processors import ImageTextProcessor

        images = Qwen2VLImageProcessorPil(
            min_pixels=IMAGE_SIZE * IMAGE_SIZE,
            max_pixels=IMAGE_SIZE * IMAGE_SIZE,
            patch_size=patch_size // 2,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        return ImageTextProcessor(images, build_tokenizer(words), LLAVA15_CHAT_TEMPLATE, QWEN2_VL, IMAGE)
    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLIP class token, dropped by "default"
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
