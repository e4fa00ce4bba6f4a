"""Real Core ML next to the MIL evaluator on one package (macOS; the CI's macOS job).

    python scripts/coreml_vs_evaluator.py PACKAGE.mlpackage --compute-units CPU_AND_NE

Runs the package with Core ML on the chosen compute units and with the MIL evaluator (both fp16
accumulation bounds) on the parity cases ``verify`` uses (photos and noise), prints max abs / cosine per
output and exits 1 when Core ML and the evaluator disagree beyond the package precision's tolerance.
"""
from __future__ import annotations

import argparse
import sys

from nextvit_deploy.backends.coreml import runner_for_artifact
from nextvit_deploy.parity import compare_outputs, tolerance_for
from nextvit_deploy.verify import candidate_input, load_artifact, parity_cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--compute-units", default="CPU_AND_NE", choices=["ALL", "CPU_AND_NE", "CPU_ONLY", "CPU_AND_GPU"])
    args = ap.parse_args()
    art = load_artifact(args.package)
    tol = tolerance_for(art.precision)
    coreml = runner_for_artifact(art, backend="coreml", compute_units=args.compute_units)
    ok = True
    with coreml:
        for accumulate in ("fp32", "fp16"):
            with runner_for_artifact(art, backend="mil", accumulate=accumulate) as mil:
                for case, images in parity_cases(art, max_batch=1):
                    x = {art.input_name: candidate_input(images, art)}
                    result = compare_outputs(mil.infer(x), coreml.infer(x), tolerance=tol, case=case)
                    for o in result.outputs:
                        print(f"{args.compute_units:11s} evaluator accumulate={accumulate} {case:10s} {o.name:10s} "
                              f"max_abs={o.max_abs:.3e} cosine={o.cosine:.7f} {'ok' if o else 'FAIL'}")
                    ok = ok and result.passed
    print("Core ML and the MIL evaluator agree" if ok else f"Core ML and the MIL evaluator disagree beyond {tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
