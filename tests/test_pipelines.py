"""`transformers.pipeline` on ClusterSTM checkpoints: the model card's `feature-extraction` tag and the two custom
pipelines shipped as remote code (zero-shot video classification, text-to-video retrieval)."""

import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor, pipeline

from clusterstm.hub.export import init_checkpoint
from clusterstm.hub.model_card import build_model_card

torch.set_num_threads(1)

LABELS = ["a red circle moves left", "a blue square", "a green triangle spins"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_checkpoint("tiny", tmp_path_factory.mktemp("pipelines") / "ckpt", seed=0)


def clips(count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8) for _ in range(count)]


def reference_similarities(folder, videos, texts) -> torch.Tensor:
    """(num_texts, num_videos) cosine similarities computed with the model directly."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        video = model.get_video_features(
            pixel_values_videos=processor(videos=videos, return_tensors="pt")["pixel_values"]
        )
        text = model.get_text_features(**processor(text=texts, return_tensors="pt"))
    video = torch.nn.functional.normalize(video.pooler_output, dim=-1)
    text = torch.nn.functional.normalize(text.pooler_output, dim=-1)
    return text @ video.t(), model.scaled_logit_scale().detach()


def test_every_declared_pipeline_tag_works(folder):
    card = build_model_card(json.loads((folder / "config.json").read_text()), run_info={})
    tag = card.data.pipeline_tag
    assert tag == "feature-extraction"
    extractor = pipeline(tag, model=str(folder))
    features = np.asarray(extractor(LABELS[0]))
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        direct = model(**AutoProcessor.from_pretrained(folder)(text=[LABELS[0]], return_tensors="pt")).text_embeds
    assert features.shape == (1, model.config.projection_dim)
    np.testing.assert_allclose(features, direct.numpy(), rtol=1e-5, atol=1e-6)


def test_config_names_the_custom_pipelines(folder):
    config = json.loads((folder / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"zero-shot-video-classification", "text-to-video-retrieval"}
    for info in config["custom_pipelines"].values():
        module, _ = info["impl"].split(".")
        assert (folder / f"{module}.py").is_file()


def test_zero_shot_video_classification(folder):
    classifier = pipeline("zero-shot-video-classification", model=str(folder), trust_remote_code=True)
    videos = clips(2)
    result = classifier(videos[0], candidate_labels=LABELS, hypothesis_template="{}")
    assert [r["label"] for r in result] and sorted(r["label"] for r in result) == sorted(LABELS)
    similarities, scale = reference_similarities(folder, videos[:1], LABELS)
    expected = (scale * similarities[:, 0]).softmax(-1)
    by_label = {r["label"]: r["score"] for r in result}
    np.testing.assert_allclose([by_label[label] for label in LABELS], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
    batched = classifier(videos, candidate_labels=LABELS, hypothesis_template="{}")
    assert len(batched) == 2 and [r["label"] for r in batched[0]] == [r["label"] for r in result]
    np.testing.assert_allclose([r["score"] for r in batched[0]], [r["score"] for r in result], rtol=1e-5)
    with pytest.raises(ValueError, match="candidate_labels"):
        classifier(videos[0])


def test_text_to_video_retrieval(folder):
    retriever = pipeline("text-to-video-retrieval", model=str(folder), trust_remote_code=True)
    videos = clips(3)
    ranked = retriever(LABELS[1], videos=videos)
    similarities, _ = reference_similarities(folder, videos, LABELS[1:2])
    order = similarities[0].argsort(descending=True).tolist()
    assert [r["index"] for r in ranked] == order
    np.testing.assert_allclose([r["score"] for r in ranked], similarities[0, order].numpy(), rtol=1e-4, atol=1e-5)
    top = retriever(LABELS, videos=videos, top_k=1)
    assert len(top) == 3 and all(len(r) == 1 for r in top)
    with pytest.raises(ValueError, match="videos"):
        retriever(LABELS[0])


_REMOTE_SCRIPT = r"""
import json, sys


class BlockClusterSTM:
    # The package must not be importable: the checkpoint's own flat files are the only source of the classes.
    def find_spec(self, name, path=None, target=None):
        if name == "clusterstm" or name.startswith("clusterstm."):
            raise ImportError("clusterstm is blocked in this process")


sys.meta_path.insert(0, BlockClusterSTM())
try:
    import clusterstm  # noqa: F401
    raise SystemExit("clusterstm must not be importable here")
except ImportError:
    pass
import numpy as np
from transformers import pipeline

rng = np.random.default_rng(0)
videos = [rng.integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8) for _ in range(3)]
classifier = pipeline("zero-shot-video-classification", model=sys.argv[1], trust_remote_code=True)
retriever = pipeline("text-to-video-retrieval", model=sys.argv[1], trust_remote_code=True)
print("RESULT=" + json.dumps({
    "classes": [type(classifier).__module__, type(retriever).__module__, type(classifier.model).__module__],
    "zero_shot": classifier(videos[0], candidate_labels=json.loads(sys.argv[2]), hypothesis_template="{}"),
    "retrieval": retriever(json.loads(sys.argv[2])[1], videos=videos),
}))
"""


def test_custom_pipelines_work_as_remote_code_without_the_package(folder, tmp_path):
    in_process_classifier = pipeline("zero-shot-video-classification", model=str(folder), trust_remote_code=True)
    in_process_retriever = pipeline("text-to-video-retrieval", model=str(folder), trust_remote_code=True)
    videos = clips(3)
    script = tmp_path / "remote.py"
    script.write_text(_REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), json.dumps(LABELS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT=", 1)[1])
    assert all(module.startswith("transformers_modules") for module in result["classes"])
    expected_zero_shot = in_process_classifier(videos[0], candidate_labels=LABELS, hypothesis_template="{}")
    assert [r["label"] for r in result["zero_shot"]] == [r["label"] for r in expected_zero_shot]
    np.testing.assert_allclose(
        [r["score"] for r in result["zero_shot"]], [r["score"] for r in expected_zero_shot], rtol=1e-4
    )
    expected_ranking = in_process_retriever(LABELS[1], videos=videos)
    assert [r["index"] for r in result["retrieval"]] == [r["index"] for r in expected_ranking]
