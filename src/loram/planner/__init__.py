"""`loram plan`: parameters, storage and training memory of (Q)LoRA / (Q)LoRAM from a config alone.

    from loram.planner import predict, PruneSpec, TrainSettings
    p = predict(config, PruneSpec("structured", 0.85, layers="4:78"), TrainSettings(seq_len=512))
    p.params_pruned, p.storage_reduction_nf4, p.schemes["QLoRAM"].gb, p.schemes["QLoRAM"].terms

Parameters are exact (params.py: closed form with `loram prune`'s rounding; a PrunePlan gives
its own kept lists). Memory is a model (memory.py: every term named, the overhead stated),
checked against measured peaks in benchmarks/plan_vs_measured.py. Each pipeline stage's peak, in
memory and streamed layer by layer (stages.py), is what loram.budget.choose_streaming decides with:

    predict_in_memory("prune", config, PruneSpec("taylor", 0.5), StageInputs(calib_samples=8))

Storage reduction, the paper's convention. The paper's "storage reduction" of QLoRAM-Stru is the
original model at 16 bits over the pruned model at 4 bits for *every* parameter, i.e. 4x the
parameter reduction:

    LLaMA-3.1-70B  P = 70,553,706,496   ratio 0.85 on layers 4:78 -> F_i = 28672 - ceil(28672*0.85) = 4300,
                   K_i = 8 - floor(8*0.85) = 2 KV groups  ->  P' = 17,849,982,976
                   16 P / (4 P') = 4 * 3.95259 = 15.81x
    LLaMA-2-70B    P = 68,976,648,192   (vocab 32000)   ->  P' = 16,272,924,672
                   16 P / (4 P') = 4 * 4.23874 = 16.95x

Counting the quantized decoder linears at 4 bits but the embeddings / lm_head / norms at 16 bits
gives 11.68x and 15.46x instead, so the published numbers use the flat 4-bit convention; it is
``storage_reduction_nf4``. What an NF4 + double-quant model really stores (4-bit linears + their
quantization constants + 16-bit embeddings, lm_head, norms) is ``storage_reduction_nf4_actual``,
with the constants reported apart in ``Storage.nf4_constants``.
"""

from .memory import OVERHEAD_GB_CPU, MemoryEstimate, TrainSettings, estimate
from .params import METHODS, SPARSE, STRUCTURED, LayerWidths, ParamCounts, PruneSpec, count, layer_widths, storage
from .predict import SCHEMES, Prediction, predict, smallest_ratio
from .presets import preset_config, preset_names, resolve
from .stages import StageInputs, StagePeak, predict_in_memory, predict_stage, stage_peaks

__all__ = [
    "METHODS", "OVERHEAD_GB_CPU", "SCHEMES", "SPARSE", "STRUCTURED", "LayerWidths", "MemoryEstimate", "ParamCounts",
    "Prediction", "PruneSpec", "TrainSettings", "count", "estimate", "layer_widths", "predict", "preset_config",
    "preset_names", "resolve", "smallest_ratio", "storage",
    "StageInputs", "StagePeak", "predict_in_memory", "predict_stage", "stage_peaks",
]
