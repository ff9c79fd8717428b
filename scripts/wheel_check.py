"""Checks of fusedtrain's sdist and wheel, run by ``bash scripts/dev.sh wheel``.

  python scripts/wheel_check.py sdist dist/fusedtrain-*.tar.gz
      every file under csrc/ and python/ (and the build files) is in the sdist.
  python scripts/wheel_check.py describe dist/fusedtrain-*.whl
      prints, as JSON, what the wheel holds, read without fusedtrain: the torch pin of its metadata, whether its
      library links torch's CUDA library, and the cubins/PTX in it (cuobjdump, from the CUDA toolkit).
  python scripts/wheel_check.py install FACTS_JSON
      in the environment the wheel was installed into: no compiler on PATH, ``import fusedtrain`` loads the
      installed copy, ``build_info()`` agrees with FACTS, optimizers step like torch.optim, dropout runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc")


def check_sdist(path: str) -> None:
    with tarfile.open(path) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {str(p.relative_to(ROOT)) for tree in ("csrc", "python") for p in (ROOT / tree).rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")
              and ".egg-info" not in str(p)}
    wanted |= {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    missing = sorted(wanted - names)
    if missing:
        sys.exit(f"wheel_check: the sdist {path} lacks {missing}; add them to MANIFEST.in")
    print(f"wheel_check: sdist OK: {len(wanted)} source files present in {os.path.basename(path)}")


def _canonical_archs(cubins: set[str], ptx: set[str]) -> str:
    """The form build_info()["cuda_archs"] uses: "7.5;9.0+PTX" (same as setup.py's _compiled_archs)."""
    def key(a: str) -> tuple[int, int, str]:
        major, minor, variant = re.match(r"(\d+)\.(\d+)(\w?)", a).groups()
        return int(major), int(minor), variant
    return ";".join(a + ("+PTX" if a in ptx else "") for a in sorted(cubins | ptx, key=key))


def _setup_module():
    """setup.py's helpers (its setup() runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("fusedtrain_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_cuobjdump() -> str:
    """cuobjdump of the toolkit setup.py would use, else on PATH, else the copy triton (a torch dependency) ships."""
    home = _setup_module()._find_cuda_home(None)
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates.append(shutil.which("cuobjdump"))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for tool in candidates:
        if tool and os.access(tool, os.X_OK):
            return tool
    sys.exit("wheel_check: the wheel has CUDA kernels but no cuobjdump was found to list them (set CUDA_HOME)")


def describe_wheel(path: str) -> dict:
    with zipfile.ZipFile(path) as whl:
        metadata = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in whl.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        library = next(n for n in whl.namelist() if re.match(r"fusedtrain/_C\..*\.so$", n))
        with tempfile.TemporaryDirectory() as tmp:
            so = whl.extract(library, tmp)
            data = Path(so).read_bytes()
            cuda = b"libc10_cuda.so" in data  # a DT_NEEDED entry of the CUDA build only
            cubins: set[str] = set()
            ptx: set[str] = set()
            if cuda:
                tool = _find_cuobjdump()
                for flag, found in (("--list-elf", cubins), ("--list-ptx", ptx)):
                    out = subprocess.run([tool, flag, so], capture_output=True, text=True, check=True).stdout
                    found.update(f"{m[0]}.{m[1]}{m[2]}" for m in re.findall(r"\bsm_(\d+)(\d)([af]?)\b", out))
    return {"requires": requires, "cuda": cuda, "cuda_archs": _canonical_archs(cubins, ptx)}


def check_install(facts: dict) -> None:
    found = {c: shutil.which(c) for c in COMPILERS if shutil.which(c)}
    assert not found, f"a compiler is on PATH: {found}"
    import torch

    import fusedtrain

    where = Path(fusedtrain.__file__).resolve()
    assert Path(sys.prefix).resolve() in where.parents, f"fusedtrain imported from {where}, not the installed wheel"
    info = fusedtrain.build_info()
    series = ".".join(torch.__version__.split(".")[:2])
    assert f"torch=={series}.*" in facts["requires"], (facts["requires"], torch.__version__)
    assert info["torch_built"].startswith(series + "."), (info["torch_built"], torch.__version__)
    assert info["cuda"] == facts["cuda"], (info["cuda"], facts["cuda"])
    assert info["cuda_archs"] == facts["cuda_archs"], (info["cuda_archs"], facts["cuda_archs"])
    assert bool(info["cuda_version"]) == facts["cuda"], info
    # An optimizer steps as torch.optim does (the compiled CPU kernels, no JIT anywhere).
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.float64) for n in (1, 7, 4097)]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = fusedtrain.optim.AdamW(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    dropped = fusedtrain.nn.functional.dropout(torch.ones(10000), p=0.5, training=True)
    assert 0.4 < (dropped == 0).float().mean().item() < 0.6
    print(f"wheel_check: installed wheel OK: {where.parent} on torch {torch.__version__}, no compiler on PATH; "
          f"build_info {json.dumps(info)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["sdist", "describe", "install"])
    parser.add_argument("arg", help="the sdist, the wheel, or the JSON facts `describe` printed")
    args = parser.parse_args()
    if args.what == "sdist":
        check_sdist(args.arg)
    elif args.what == "describe":
        print(json.dumps(describe_wheel(args.arg)))
    else:
        check_install(json.loads(args.arg))


if __name__ == "__main__":
    main()
