"""TEST-ONLY shim (put on PYTHONPATH of a torchrun child by tests/test_fsdp.py): let accelerate run
FSDP on CPU/gloo so the real Trainer + accelerate + loram code paths run sharded.

Why: accelerate 1.15's AcceleratorState switches distributed_type to FSDP only from MULTI_GPU /
NPU / XPU / ..., never from MULTI_CPU (accelerate/state.py, the `elif self.distributed_type in [...]`
branch), so on a CPU-only machine `ACCELERATE_USE_FSDP=true` silently trains replicated parameters
(plain DDP). FSDP2's `fully_shard` itself works on gloo; this shim only makes that one switch, and
records, per rank, what accelerate's fsdp2_prepare_model returned (DTensor shards or not) so the test
can prove the run really was sharded. Active only when LORAM_TEST_FSDP_CPU names a marker prefix.
"""

import os

if os.environ.get("LORAM_TEST_FSDP_CPU"):
    import json

    import accelerate.accelerator as _acc
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    _init = AcceleratorState.__init__

    def _state_init(self, *a, fsdp_plugin=None, **kw):
        _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # what state.py does for MULTI_GPU
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = _state_init

    _prepare = _acc.fsdp2_prepare_model
    _calls = []

    def _fsdp2_prepare_model(accelerator, model):
        model = _prepare(accelerator, model)
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        _calls.append(1)
        mark = {"rank": int(os.environ["RANK"]), "call": len(_calls), "params": len(params),
                "dtensor": sum(isinstance(p, DTensor) for p in params),
                "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                "global_numel": sum(p.numel() for p in params)}
        with open(f"{os.environ['LORAM_TEST_FSDP_CPU']}.{mark['call']}.{mark['rank']}.json", "w") as f:
            json.dump(mark, f)
        return model

    _acc.fsdp2_prepare_model = _fsdp2_prepare_model
