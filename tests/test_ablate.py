"""python -m capi_lab.ablate: the studies, a run on a sliver of the protocol, reuse of finished rows, the table,
and the committed full-mode results the notebooks show."""

import json
import os

import pytest

from capi_lab import ablate
from capi_lab.data import FASHION_MNIST_DIR

SLIVER = ablate.Protocol(steps=3, batch_size=8, limit_train=120, limit_test=60)


def _need_fashion_mnist():
    if not FASHION_MNIST_DIR.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST_DIR} is missing: .ci/run installs dataset-fashion-mnist")
        pytest.skip("Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")


def test_list_names_every_study_and_row_with_the_papers_figure(capsys):
    assert ablate.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, study in ablate.STUDIES.items():
        assert f"{name}: {study.title} ({study.reference})" in out
        for v in study.variants:
            assert v.name in out and v.paper in out


def test_every_row_is_a_valid_training_command(tmp_path):
    """Each variant's flags parse into the config they are meant to change."""
    from capi_lab.train import resolve_config

    seen = {}
    for study in ablate.STUDIES.values():
        for v in study.variants:
            run = resolve_config(ablate.train_command(v, ablate.Protocol(), tmp_path / "x"))
            seen[v.name] = run.capi
    assert seen["random"].mask.strategy == "random" and not seen["random"].mask.roll
    assert seen["inverse block"].mask.strategy == "inverse_block" and not seen["inverse block"].mask.roll
    assert seen["inverse block + roll"].mask.roll
    assert seen["softmax (no balancing)"].optim.sinkhorn_iters == 0
    assert not seen["standard Sinkhorn"].optim.sinkhorn_positionwise
    assert seen["position-wise Sinkhorn"].optim.sinkhorn_positionwise
    assert seen["256"].model.num_prototypes == 256


def test_a_study_on_a_sliver_of_the_protocol(tmp_path, capsys):
    _need_fashion_mnist()
    only = ["softmax (no balancing)", "position-wise Sinkhorn"]
    result = ablate.run("balancing", SLIVER, tmp_path / "runs", only=only)
    assert [r["name"] for r in result.rows] == only
    for r in result.rows:
        assert 0 < r["knn_global"] <= 100 and 0 < r["knn_mean_patch"] <= 100
        assert r["curves"]["step"] == [1, 2, 3] and len(r["curves"]["target_entropy"]) == 3
        assert r["target_entropy"] == r["curves"]["target_entropy"][-1]
    assert 0 < result.before_training["knn_global"] <= 100
    table = result.table()
    assert "| before training |" in table and "| position-wise Sinkhorn |" in table and "29.1 / 81.4" in table
    assert "softmax (no balancing): k-NN" in capsys.readouterr().out
    # the run folders are reused: a second call retrains nothing and scores the same
    again = ablate.run("balancing", SLIVER, tmp_path / "runs", only=only[1:])
    assert again.rows[0]["knn_global"] == result.rows[1]["knn_global"]
    assert again.rows[0]["curves"] == result.rows[1]["curves"]
    saved = ablate.load(result.save(tmp_path / "r.json"))
    assert saved.table() == table


def test_a_row_with_the_settings_of_another_studys_finished_row_is_not_trained_again(tmp_path, capsys):
    """The preset is a row of every study: trained once for masking, reused by balancing; a row that differs is
    trained."""
    _need_fashion_mnist()
    runs = tmp_path / "runs"
    first = ablate.run("masking", SLIVER, runs, only=["inverse block + roll"])
    assert (runs / "masking" / "inverse_block___roll_3x8_seed0" / "checkpoints" / "last.ckpt").exists()
    capsys.readouterr()
    second = ablate.run("balancing", SLIVER, runs, only=["position-wise Sinkhorn", "standard Sinkhorn"])
    out = capsys.readouterr().out
    assert "position-wise Sinkhorn: same settings as the finished run" in out and "inverse_block___roll" in out
    assert not (runs / "balancing" / "position_wise_Sinkhorn_3x8_seed0").exists()
    assert (runs / "balancing" / "standard_Sinkhorn_3x8_seed0" / "checkpoints" / "last.ckpt").exists()
    assert "standard Sinkhorn: same settings" not in out
    reused = next(r for r in second.rows if r["name"] == "position-wise Sinkhorn")
    assert reused["curves"] == first.rows[0]["curves"] and reused["knn_global"] == first.rows[0]["knn_global"]
    # a damaged config.yaml elsewhere under the same folder is passed over, not an error
    (runs / "masking" / "inverse_block___roll_3x8_seed0" / "config.yaml").write_text("[not: a mapping")
    variant = next(v for v in ablate.STUDIES["balancing"].variants if v.name == "position-wise Sinkhorn")
    assert ablate.finished_twin(variant, SLIVER, runs / "b" / "x", runs) is None
    # another protocol (more steps) is another run: nothing finished matches it
    longer = ablate.Protocol(steps=4, batch_size=8, limit_train=120, limit_test=60)
    assert ablate.finished_twin(ablate.STUDIES["balancing"].variants[2], longer, runs / "b" / "x", runs) is None


def test_cli_errors_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["masking", "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main(["masking", "--only", "checkerboard"])
    err = capsys.readouterr().err
    assert "checkerboard" in err and "inverse block + roll" in err


@pytest.mark.parametrize("study", sorted(ablate.STUDIES))
def test_the_committed_full_results_match_the_studies(study):
    """What the notebooks show in smoke mode: one committed full-protocol result per study, every row present."""
    result = ablate.cached(study)
    assert result.protocol["steps"] == ablate.Protocol().steps
    assert [r["name"] for r in result.rows] == [v.name for v in ablate.STUDIES[study].variants]
    assert json.loads(json.dumps(result.rows))  # plain JSON
    assert all(r["knn_global"] > 0 for r in result.rows)
