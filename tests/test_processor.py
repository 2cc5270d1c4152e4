"""GenreProcessor (mmgcs/processor.py), directly: the bundle's raw-input side built from a bundle folder gives the very
tensors the loaded model's own processor gives (tokens, lexical n-grams with the stored idf, posters), the decisions
at the bundle's thresholds, the text template, and the input errors with their remedies."""

from pathlib import Path

import pytest
import torch

import mmgcs
from mmgcs import GenreClassifier
from mmgcs.hub.errors import BundleError
from mmgcs.inference import Predictor
from mmgcs.processor import NO_INPUT, GenreProcessor, paired_inputs
from mmgcs.testing import tiny_model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bundle_v1"  # lexical branch, "{title}. {plot}", thresholds
POSTER = FIXTURE.parent / "poster_0.png"
PLOTS = ["A ghost haunts a lonely house at night.", None, "Two friends open a bakery and fall in love."]


@pytest.fixture(scope="module")
def loaded():
    return GenreClassifier.from_pretrained(FIXTURE)


def test_a_processor_from_the_bundle_gives_the_loaded_models_tensors_bit_for_bit(loaded):
    assert mmgcs.GenreProcessor is GenreProcessor  # the public spelling
    processor = GenreProcessor.from_pretrained(FIXTURE)
    assert processor.lexical is not None and bool(processor.lexical.idf.abs().sum() > 0)  # the stored idf, read
    posters = [POSTER.read_bytes(), POSTER, None]
    got, want = processor(PLOTS, posters), GenreProcessor.from_model(loaded)(PLOTS, posters)
    assert set(got) == set(want) >= {"input_ids", "attention_mask", "text_mask", "lexical_ids", "lexical_values",
                                     "pixel_values", "image_mask"}
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["text_mask"].tolist() == [True, False, True] and got["image_mask"].tolist() == [True, True, False]


def test_a_predictor_over_the_bundles_processor_predicts_the_same_scores_to_the_bit(loaded):
    titles = ["The House", None, "Paris"]
    via_model = loaded.predict_batch(PLOTS, [POSTER, POSTER, None], by_modality=True, titles=titles)
    predictor = Predictor(loaded, processor=GenreProcessor.from_pretrained(FIXTURE))
    assert predictor.predict_batch(PLOTS, [POSTER, POSTER, None], by_modality=True, titles=titles) == via_model


def test_decisions_follow_the_bundles_thresholds_highest_score_first():
    processor = GenreProcessor.from_pretrained(FIXTURE)  # labels Action, Comedy, Drama, Horror; thresholds .3 .6 .5 .45
    assert processor.thresholds() == pytest.approx([0.3, 0.6, 0.5, 0.45])
    probs = torch.tensor([[0.35, 0.59, 0.9, 0.46], [0.1, 0.2, 0.3, 0.4]])
    assert processor.decisions(probs) == [["Drama", "Horror", "Action"], []]
    lowered = GenreProcessor.from_pretrained(FIXTURE, thresholds=[0.3, 0.5, 0.5, 0.45])
    assert lowered.decisions(probs)[0] == ["Drama", "Comedy", "Horror", "Action"]


def test_a_processor_from_a_model_sees_its_config_change_and_singlelabel_takes_the_top_genre():
    model = tiny_model(image=False, task="singlelabel")
    processor = GenreProcessor.from_model(model)
    assert processor.decisions(torch.tensor([[0.2, 0.5, 0.3]])) == [["Comedy"]]
    multi = tiny_model(image=False)
    processor = GenreProcessor.from_model(multi)
    multi.config.threshold = 0.1
    assert processor.decisions(torch.tensor([[0.05, 0.5, 0.3]])) == [["Comedy", "Drama"]]


def test_the_text_template_puts_the_title_before_the_plot_only_when_both_are_there():
    processor = GenreProcessor.from_pretrained(FIXTURE)
    assert processor.compose(["A plot.", "A plot.", None, "A plot."], ["Title", None, "Title", "  "]) == [
        "Title. A plot.", "A plot.", None, "A plot."]
    assert processor.compose(["A plot."]) == ["A plot."]
    with pytest.raises(ValueError, match="Got 1 titles for 2 movies"):
        processor.compose(["a", "b"], ["t"])
    with pytest.raises(TypeError, match="title #0 must be a string or None, got int"):
        processor.compose(["a"], [3])


def test_inputs_a_model_cannot_read_are_refused_with_the_remedy():
    plots_only = GenreProcessor.from_model(tiny_model(image=False))
    posters_only = GenreProcessor.from_model(tiny_model(text=False))
    with pytest.raises(ValueError, match="reads plots only; pass plot="):
        plots_only.validated(None, [POSTER])
    with pytest.raises(ValueError, match="movie #1: this model reads posters only"):
        posters_only.validated(["a plot", "another"], [POSTER, None])
    with pytest.raises(ValueError, match=r"Nothing to classify.*\(the plot is empty\)"):
        plots_only.validated(["   "], None)
    with pytest.raises(ValueError, match="Nothing to classify"):
        plots_only.validated(None, None)
    with pytest.raises(TypeError, match="plot #0 must be a string or None, got int"):
        plots_only.validated([5], None)
    with pytest.raises(ValueError, match="Got 2 plots and 1 posters"):
        paired_inputs(["a", "b"], [None])
    assert NO_INPUT.startswith("Nothing to classify")


def test_a_text_model_without_a_tokenizer_and_a_bad_poster_say_what_to_do():
    model = tiny_model(image=True)
    bare = GenreProcessor.from_config(model.config)  # no tokenizer given
    with pytest.raises(ValueError, match="no tokenizer.*GenreClassifier.from_pretrained"):
        bare(["a plot"], None)
    posters = GenreProcessor.from_model(tiny_model(text=False))
    with pytest.raises(Exception, match="poster #1"):
        posters(None, [POSTER, b"not an image"])
    with pytest.raises(ValueError, match="needs plots and/or posters"):
        posters()


def test_a_processor_from_a_missing_folder_is_refused_as_the_model_is(tmp_path):
    with pytest.raises(BundleError) as model_error:
        GenreClassifier.from_pretrained(tmp_path / "nope")
    with pytest.raises(BundleError) as processor_error:
        GenreProcessor.from_pretrained(tmp_path / "nope")
    assert str(processor_error.value) == str(model_error.value)
    with pytest.raises(TypeError, match="from_pretrained"):
        GenreProcessor.from_pretrained(FIXTURE, labels=["x"])  # not an inference-only field
