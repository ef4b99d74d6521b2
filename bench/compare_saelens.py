"""cytosae's TopK/BatchTopK SAE against SAELens's: same data, same settings, one process per run.

    .venv-saelens/bin/python bench/compare_saelens.py [--arch topk|batchtopk] [--quick] [--tokens N]
        [--epochs E] [--threads T] [--store STORE]

Run from the repository root in the SAELens venv (bench/requirements-saelens.txt, `make bench-saelens`);
sae-lens is never installed into the project venv. Data, held-out split, evaluation, timing (every measured
run in its own child process, E and 2E epochs, ABBA, best of --repeats), peak memory and the dense
encoder-product ceiling are bench/compare.py's (one owner).

Each library keeps its own model, loss and training step:
  ours   cytosae.sae.train_sae(arch, lr_warmup_steps=0), defaults otherwise (as in bench/compare.py).
  theirs sae_lens.TopKTrainingSAE / BatchTopKTrainingSAE with its config defaults (decoder_init_norm 0.1,
         rescale_acts_by_decoder_norm, b_dec applied to the input, AuxK coefficient 1 on latents dead for
         its dead_feature_window of 1,000 steps, so inactive in short runs, normalize_activations "none"),
         trained by SAELens's own sae_lens.SAETrainer: it takes any iterator of (batch, d_in) activation
         tensors as its data provider, so the same batches in the same order go straight in, no hooked
         model. Its training step is its own: training_forward_pass (MSE summed over d, mean over tokens,
         plus the aux losses), backward, clip_grad_norm 1.0, torch Adam (betas 0.9, 0.999), its "constant"
         lr scheduler with no warm-up (its defaults), wandb logging off, no checkpoints.
         Evaluated in its inference form (what save_inference_model writes, built in memory): TopKSAE, and
         for BatchTopK the JumpReLUSAE with its learned global threshold, so L0 there is measured, not set.
Writes bench/results/compare-saelens.json (bench/_report.write_result) and prints it.
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_result  # noqa: E402
from compare import (REPO, add_shared_args, evaluate, finish_args, measure, peer_verdict, run_settings,  # noqa: E402
                     side_summary, train_ours)  # noqa: E402


def import_saelens():
    try:
        import sae_lens
        from sae_lens.training.sae_trainer import SAETrainer  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"sae_lens is not importable ({e}); run in .venv-saelens (`make bench-saelens`, "
                         "bench/requirements-saelens.txt)") from e
    return sae_lens


def train_theirs(batches: list[torch.Tensor], epochs: int, a) -> tuple[object, float]:
    sl = import_saelens()
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def provider():  # SAELens's DataProvider: an iterator of (batch, d_in) activations
        for _ in range(epochs):
            yield from batches

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    cfg_cls, sae_cls = ((sl.TopKTrainingSAEConfig, sl.TopKTrainingSAE) if a.arch == "topk"
                        else (sl.BatchTopKTrainingSAEConfig, sl.BatchTopKTrainingSAE))
    sae = sae_cls(cfg_cls(d_in=a.d, d_sae=a.n_latents, k=a.k, dtype="float32", device="cpu"))
    total = epochs * sum(b.shape[0] for b in batches)
    tcfg = SAETrainerConfig(total_training_samples=total, train_batch_size_samples=a.batch, lr=a.lr,
                            lr_end=a.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu",
                            logger=LoggingConfig(log_to_wandb=False))
    trained = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider()).fit()
    return trained, time.perf_counter() - t0


def inference_sae(trained):
    """The inference SAE that SAELens's save_inference_model would write (TopKSAE; JumpReLUSAE for BatchTopK,
    its threshold the learned topk_threshold), built in memory."""
    from sae_lens import SAE

    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    trained.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.eval()


def evaluate_side(name: str, model, x_test: torch.Tensor, a) -> dict:
    with torch.inference_mode():
        if name == "ours":
            return evaluate(model.encode, model.decode, x_test, a.n_latents)
        sae = inference_sae(model)
        return evaluate(sae.encode, sae.decode, x_test, a.n_latents)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("topk", "batchtopk"), default="topk",
                    help="both sides' TopK or BatchTopK SAE (SAELens's TopKTrainingSAE / BatchTopKTrainingSAE)")
    add_shared_args(ap, REPO / "bench" / "results" / "compare-saelens.json")
    return finish_args(ap.parse_args())


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    measured = measure(a, {"ours": train_ours, "theirs": train_theirs}, evaluate_side)
    if measured is None:  # a measured child: done
        return
    runs, dense = measured["runs"], measured["dense"]
    ours, theirs = (side_summary(runs[name], a, dense) for name in ("ours", "theirs"))
    verdict, speed = peer_verdict(ours, theirs, dense, "SAELens")
    theirs_sae = "TopKTrainingSAE" if a.arch == "topk" else "BatchTopKTrainingSAE"
    result = {
        "what": f"{a.arch} SAE training throughput (tokens/s) and held-out FVU at equal L0, cytosae vs SAELens, "
                f"same {'real' if a.store else 'synthetic'} tokens/order/settings, one process per run, CPU",
        "library": {"name": "sae-lens", "version": metadata.version("sae-lens")},
        "cytosae_version": metadata.version("cytosae"),
        "torch": torch.__version__,
        "settings": run_settings(a, runs["ours"]["data"], "Adam (torch)",
                                 ours_options=f"train_sae(arch='{a.arch}', lr_warmup_steps=0); defaults otherwise",
                                 theirs_options=f"sae_lens.{theirs_sae}(config defaults, k={a.k}) trained by "
                                                "sae_lens.SAETrainer(SAETrainerConfig(lr, constant scheduler, no "
                                                "warm-up, wandb off)) on the same batches as its data provider; "
                                                "evaluated as the inference SAE save_inference_model writes"),
        "dense_encoder_product": dense,
        "ours": ours,
        "theirs": theirs,
        "speed_ratio_ours_over_theirs": round(speed, 3),
        "verdict": verdict,
    }
    write_result(a.out, result)


if __name__ == "__main__":
    main()
