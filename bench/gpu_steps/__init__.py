"""The steps of bench/gpu_check.py, one module each; every step runs in its own process.

    paths.py       1. which Mamba path train / eval / generate take (fused kernels, h1tune's dispatcher, fallback)
    probe.py       2. the adapter probe under the fused kernel: defaults live, a forced out_proj LoRA inert
    exactness.py   3. packed == unpacked with seq_idx (fp32, bf16); kernel_match.py: h1tune's kernels vs the real ones
    throughput.py  4. SFT tokens/s, peak memory and MFU: h1tune packed / padded vs TRL + peft padded
    qlora.py       5. QLoRA 4-bit: a few steps, then merge into the dequantized base and verify

Each exposes `run(ctx) -> StepResult` (common.py). On CPU (`--cpu`, the dry run the test suite
runs) the same code runs on the tiny preset; where a GPU-only piece has a CPU stand-in, the
result says which stand-in was used.
"""

STEPS = ("paths", "probe", "exactness", "throughput", "qlora")
TITLES = {
    "paths": "1. Mamba path per mode",
    "probe": "2. adapter probe",
    "exactness": "3. packed vs unpacked exactness, h1tune kernels vs real kernels",
    "throughput": "4. SFT throughput, peak memory, MFU",
    "qlora": "5. QLoRA 4-bit: train, merge into the dequantized base, verify",
}
