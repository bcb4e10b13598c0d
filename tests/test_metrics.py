"""Metric functions on hand-made embeddings, and the encoders on the tiny CLIP and DINO."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from pipeline.quality.metrics import (
    METRICS,
    StyleScores,
    clip_i_score,
    clip_t_score,
    cosine_matrix,
    dino_score,
    diversity_score,
    encode_images,
    encode_texts,
    load_lpips,
    mean_pairwise_cosine,
    mean_pairwise_distance,
    neutral_prompt,
)
from pipeline.quality.prompt_ranking import fill_template, format_ranking, rank_prompts, rank_scores

E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]



# --- pure scores ------------------------------------------------------------------------------


def test_identical_embeddings_score_one_and_scale_does_not_matter() -> None:
    assert clip_i_score([E1], [E1]) == pytest.approx(1.0)
    assert dino_score([[3.0, 4.0]], [[0.3, 0.4]]) == pytest.approx(1.0)


def test_orthogonal_embeddings_score_zero_and_opposite_minus_one() -> None:
    assert clip_i_score([E1], [E2]) == pytest.approx(0.0)
    assert mean_pairwise_cosine([[1.0, 2.0]], [[-1.0, -2.0]]) == pytest.approx(-1.0)


def test_image_scores_average_over_every_generated_reference_pair() -> None:
    # Pairs: (e1,e1)=1, (e1,e3)=0, (e2,e1)=0, (e2,e3)=0 -> 1/4.
    assert clip_i_score([E1, E2], [E1, E3]) == pytest.approx(0.25)
    # One generated image against [1,0] and [1,1]: (1 + 1/sqrt 2) / 2.
    assert dino_score([[1.0, 0.0]], [[1.0, 0.0], [1.0, 1.0]]) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert cosine_matrix([E1, E2], [E1, E2, E3]).shape == (2, 3)


def test_clip_t_pairs_each_image_with_its_own_prompt_only() -> None:
    # Matched rows are identical: 1.0 (an all-pairs mean would give 0.5).
    assert clip_t_score([E1, E2], [E1, E2]) == pytest.approx(1.0)
    # Swapped: each image is orthogonal to its own prompt.
    assert clip_t_score([E1, E2], [E2, E1]) == pytest.approx(0.0)
    assert clip_t_score([[1.0, 1.0], E1[:2]], [[1.0, 0.0], [1.0, 0.0]]) == pytest.approx(
        (1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ValueError, match="2 images and 3 prompts"):
        clip_t_score([E1, E2], [E1, E2, E3])


def test_pairwise_distance_mean_is_over_distinct_pairs() -> None:
    d = [[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]]
    assert mean_pairwise_distance(d) == pytest.approx(2.0)  # (1 + 2 + 3) / 3, diagonal excluded
    with pytest.raises(ValueError, match="at least two"):
        mean_pairwise_distance([[0.0]])


def test_bad_embeddings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="all zeros"):
        clip_i_score([[0.0, 0.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="sizes differ"):
        clip_i_score([[1.0, 0.0]], [E1])
    with pytest.raises(ValueError, match="NaN"):
        dino_score([[float("nan"), 1.0]], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="non-empty"):
        clip_i_score(torch.zeros(0, 3), [E1])


def test_neutral_prompt_replaces_the_identifier_with_the_class_noun() -> None:
    assert neutral_prompt("a zqv cat sticker", identifier="zqv", class_noun="cat") == "a cat sticker"
    assert (neutral_prompt("zqv style, a dog on the beach", identifier="zqv", class_noun="cat")
            == "cat style, a dog on the beach")
    # A word merely containing the identifier is left alone.
    assert neutral_prompt("a zqvx zqv sticker", identifier="zqv", class_noun="cat") == "a zqvx cat sticker"
    assert neutral_prompt("a zqv sticker", identifier="zqv", class_noun="") == "a sticker"


def test_style_scores_get_names_the_metric() -> None:
    s = StyleScores(clip_i=0.5, clip_t=0.2, dino=0.4, diversity=None, diversity_note="no")
    assert [s.get(m) for m in METRICS] == [0.5, 0.4, 0.2, None]
    with pytest.raises(ValueError, match="unknown metric"):
        s.get("fid")


# --- encoders on the tiny models ----------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders(tiny_zoo):  # -> tuple[ImageEncoder, ImageEncoder]
    from pipeline.models import load_image_encoder, resolve_sources
    from pipeline.settings import load_settings

    settings = load_settings(preset="tiny", tiny_zoo_dir=tiny_zoo, device="cpu", dtype="float32")
    sources = resolve_sources(settings)
    return (load_image_encoder("clip", sources, device=torch.device("cpu")),
            load_image_encoder("dino", sources, device=torch.device("cpu")))


def _noise(seed: int, size: int = 48) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def test_identical_images_give_one_and_different_images_less(encoders) -> None:
    clip, dino = encoders
    a, b = _noise(1), Image.new("RGB", (48, 48), (200, 30, 30))
    for enc in (clip, dino):
        emb = encode_images(enc, [a, a.copy(), b])
        assert emb.ndim == 2 and emb.shape[0] == 3
        assert mean_pairwise_cosine(emb[:1], emb[1:2]) == pytest.approx(1.0, abs=1e-5)
        assert mean_pairwise_cosine(emb[:1], emb[2:]) < 0.999


def test_transparent_stickers_are_judged_on_white(encoders) -> None:
    clip, _ = encoders
    clear = Image.new("RGBA", (48, 48), (10, 200, 10, 0))
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    emb = encode_images(clip, [clear, white])
    assert mean_pairwise_cosine(emb[:1], emb[1:]) == pytest.approx(1.0, abs=1e-5)


def test_text_embeddings_match_image_embedding_size(encoders) -> None:
    clip, dino = encoders
    text = encode_texts(clip, ["a cat sticker", "a red dog"])
    image = encode_images(clip, [_noise(2), _noise(3)])
    assert text.shape == image.shape
    score = clip_t_score(image, text)
    assert -1.0 <= score <= 1.0
    with pytest.raises(ValueError, match="CLIP"):
        encode_texts(dino, ["a cat"])


def test_lpips_is_reported_unavailable_rather_than_faked() -> None:
    lp = load_lpips()
    groups = [[_noise(4), _noise(5), _noise(6)]]
    if lp.available:  # a machine with lpips, torchvision and the AlexNet checkpoint cached
        assert diversity_score(lp, groups) > 0.0
        assert diversity_score(lp, [[_noise(4), _noise(4)]]) == pytest.approx(0.0, abs=1e-6)
    else:
        assert lp.reason and lp.reason.startswith("LPIPS unavailable")
        assert diversity_score(lp, groups) is None


# --- prompt ranking -----------------------------------------------------------------------------


def test_rank_scores_sorts_by_margin_against_bad_examples() -> None:
    good, bad = [[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0]]
    texts = [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]  # bad-like, in between, good-like
    ranking = rank_scores(texts, good, bad, ["t0", "t1", "t2"], ["p0", "p1", "p2"])
    assert [r.template for r in ranking] == ["t2", "t1", "t0"]
    assert ranking[0].margin == pytest.approx(1.0)
    assert ranking[1].margin == pytest.approx(0.0)
    assert ranking[2].margin == pytest.approx(-1.0)
    assert ranking[1].good == pytest.approx(1 / math.sqrt(2))
    only_good = rank_scores(texts, good, None, ["t0", "t1", "t2"], ["p0", "p1", "p2"])
    assert only_good[0].bad is None and only_good[0].margin == pytest.approx(1.0)


def test_rank_prompts_with_the_tiny_clip(encoders) -> None:
    clip, _ = encoders
    images = [_noise(7), _noise(8)]
    templates = ["a telegram sticker", "a {class_noun} sticker", "a photo of a {class_noun}"]
    ranking = rank_prompts(clip, templates, good=images, bad=images, class_noun="cat")
    assert sorted(r.template for r in ranking) == sorted(templates)
    # The same images as good and bad examples: every margin is zero.
    assert all(r.margin == pytest.approx(0.0, abs=1e-6) for r in ranking)
    assert {r.prompt for r in ranking} == {"a telegram sticker", "a cat sticker", "a photo of a cat"}
    table = format_ranking(ranking)
    assert table.count("\n") == 3 and "margin" in table
    with pytest.raises(ValueError, match="good example"):
        rank_prompts(clip, templates, good=[])


def test_fill_template_drops_identifier_and_rejects_unknown_fields() -> None:
    assert fill_template("a {identifier} {class_noun} sticker", class_noun="dog") == "a dog sticker"
    with pytest.raises(ValueError, match="unknown field"):
        fill_template("a {style} sticker", class_noun="dog")
