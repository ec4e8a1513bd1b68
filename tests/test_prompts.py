"""Prompt encoding: the token spans editors and diagnostics rely on."""

import json

import pytest
from PIL import Image

from vlm import ConstraintNotFoundError, ImageDecodeError, PromptError, encode, load_image


def _tokens(vlm, prompt, span):
    return vlm.tokenizer.convert_ids_to_tokens(prompt.input_ids[span[0] : span[1]].tolist())


def test_spans_of_a_visual_question(vlm, world_dir):
    city = json.loads((world_dir / "world.json").read_text())["cities"][0]
    p = encode(
        vlm.processor,
        "Which city is this landmark in?",
        image=world_dir / "images/landmark-00-0.png",
        answer=city.capitalize(),
        constraints=["this landmark"],
    )
    a, b = p.image_span
    assert b - a == 16
    assert all(int(t) == vlm.image_token_id for t in p.input_ids[a:b])
    assert _tokens(vlm, p, p.constraint_spans[0]) == ["this", "landmark"]
    assert p.constraint_last == p.constraint_spans[0][1] - 1
    assert vlm.tokenizer.convert_ids_to_tokens(int(p.input_ids[p.last_prompt_pos])) == ":"
    assert p.answer_positions == [p.last_prompt_pos + 1]
    assert vlm.tokenizer.decode(p.answer_ids) == city  # the world's tokenizer lower-cases
    assert p.text.startswith("USER: <image>")


def test_multi_token_answer_and_two_constraints(vlm, world_dir):
    w = json.loads((world_dir / "world.json").read_text())
    country, person = w["countries"][0], w["person_names"][0]
    q = f"what does this brand from {country} make ?"
    p = encode(vlm.processor, q, answer=person, constraints=["this brand", f"from {country}"])
    assert len(p.answer_positions) == 2
    assert vlm.tokenizer.decode(p.answer_ids) == person
    assert _tokens(vlm, p, p.constraint_spans[1]) == ["from", country]
    assert p.image_span is None


def test_constraint_absent_is_a_clear_error(vlm):
    with pytest.raises(ConstraintNotFoundError, match="'this person' does not occur"):
        encode(vlm.processor, "which city is this landmark in ?", constraints=["this person"])


def test_empty_question_is_rejected(vlm):
    with pytest.raises(PromptError, match="empty"):
        encode(vlm.processor, "   ")


def test_undecodable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        load_image(bad)
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        load_image(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "missing.png")
    assert load_image(Image.new("L", (8, 8))).mode == "RGB"
