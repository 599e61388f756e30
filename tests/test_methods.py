"""The pruning methods live in one list (loram.prune_plan): what `loram prune` runs, what the planner predicts and
what a plan may record must agree, so a new method is added once (stop 16 had to edit three tuples for fisher)."""

from loram import prune_plan
from loram.planner import params
from loram.planner.presets import preset_config
from loram.planner.stages import StageInputs, predict_stage
from loram.prune import sparse, structured


def test_prune_planner_and_plan_read_the_same_methods():
    assert structured.METHODS == prune_plan.STRUCTURED_METHODS
    assert sparse.METHODS == prune_plan.SPARSE_METHODS
    assert set(params.STRUCTURED) == {"structured", *prune_plan.STRUCTURED_METHODS}  # "structured": the planner's any-of-them
    assert set(params.SPARSE) == set(prune_plan.SPARSE_METHODS) - set(prune_plan.STRUCTURED_METHODS)
    assert set(prune_plan.METHODS) == {*prune_plan.STRUCTURED_METHODS, *prune_plan.SPARSE_METHODS, "imported"}


def test_every_method_prune_runs_is_one_the_planner_predicts():
    """Each structured method gets a structured prediction, each sparse-only one a sparse one (no unknown-method error)."""
    config = preset_config("Llama-2-7B")
    for m in prune_plan.STRUCTURED_METHODS:
        spec = params.PruneSpec(m, 0.5, layers="0:32")
        assert spec.kind == "structured"
        assert predict_stage("prune", config, spec, StageInputs()).detail.split(",")[0] == m
    for m in prune_plan.SPARSE_ONLY:
        assert params.PruneSpec(m, 0.5).kind == "sparse"
