"""Safety and utility evaluation: benchmark loaders, judges, and the comparison run (``daco eval``).

    from steering.eval import load_benchmark, is_refusal, run_eval, EvalConfig
"""

from steering.eval.benchmarks import (BENIGN, HARMFUL, LOADERS, BenchmarkError, BenchmarkItem, figstep_image,
                                      load_benchmark, load_figstep, load_jailbreakv, load_mm_safetybench, load_mmbench,
                                      load_scienceqa)
from steering.eval.judges import GuardVerdict, LlamaGuardJudge, is_refusal, parse_llama_guard
from steering.eval.run import EvalConfig, EvalError, extract_choice, run_eval

__all__ = [
    "BENIGN", "HARMFUL", "LOADERS", "BenchmarkError", "BenchmarkItem", "EvalConfig", "EvalError", "GuardVerdict",
    "LlamaGuardJudge", "extract_choice", "figstep_image", "is_refusal", "load_benchmark", "load_figstep",
    "load_jailbreakv", "load_mm_safetybench", "load_mmbench", "load_scienceqa", "parse_llama_guard", "run_eval",
]
