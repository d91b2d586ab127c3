"""Fault sweep: bad inputs and hostile files against every command, as a new user or an
attacker would try them. Counts one-line errors, tracebacks and code execution.

    .venv/bin/python tests/fault_sweep.py      # about 2 minutes on 2 cores (one case waits
                                               # for the model hub's retries)

Prints every case that did not end in exit 0/2/130 with one line, then the counts. The unit
tests check each class of fault; this script is the wide net.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import sdsurgery  # noqa: E402
from sdsurgery_cli.main import app  # noqa: E402

W = Path(tempfile.mkdtemp(prefix="sdsurgery-faults-"))
os.chdir(W)
MARK = W / "pwned"
runner = CliRunner()
ok = W / "ok.safetensors"
sdsurgery.save(sdsurgery.convert(sdsurgery.create_model("cifar_resnet20", num_classes=10), seed=1), ok)
META = sdsurgery.read_metadata(ok); TENS = load_file(str(ok))
(W / "evil.py").write_text(f"open({str(MARK)!r}, 'w').close()\ndef f(): pass\n")

def ck(name, change=None, tensors=None, raw=None):
    p = W / name
    if raw is not None:
        p.write_bytes(raw); return p
    m = json.loads(json.dumps(META))
    if change: change(m)
    save_file(tensors if tensors is not None else TENS, str(p), metadata={"sdsurgery": json.dumps(m) if not isinstance(m, str) else m})
    return p

def setk(path, value):
    def c(m):
        node = m
        for k in path[:-1]: node = node[k]
        if value is KeyError: del node[path[-1]]
        else: node[path[-1]] = value
    return c

files = {
 "spec subprocess": ck("a1.safetensors", setk(("model",), {"spec": "subprocess:getoutput", "kwargs": {"cmd": f"touch {MARK}"}})),
 "spec os.system": ck("a2.safetensors", setk(("model",), {"spec": "os:system", "kwargs": {"command": f"touch {MARK}"}})),
 "spec file.py": ck("a3.safetensors", setk(("model",), {"spec": "evil.py:f"})),
 "spec builtins.exec": ck("a4.safetensors", setk(("model",), {"spec": "builtins:exec", "kwargs": {"source": f"open({str(MARK)!r},'w')"}})),
 "spec torch.hub": ck("a5.safetensors", setk(("model",), {"spec": "torch.hub:load", "kwargs": {"repo_or_dir": "x/y", "model": "z"}})),
 "kwargs checkpoint_path": ck("a6.safetensors", setk(("model", "kwargs"), {"checkpoint_path": "x.pth"})),
 "leaf unimported": ck("a7.safetensors", setk(("stochastic_depth", "leaf_modules"), ["evil:f"])),
 "leaf os.system": ck("a8.safetensors", setk(("stochastic_depth", "leaf_modules"), ["os:system"])),
 "leaf unknown name": ck("a9.safetensors", setk(("stochastic_depth", "leaf_modules"), ["no.such.module"])),
 "num_classes str": ck("b1.safetensors", setk(("model", "num_classes"), "ten")),
 "num_classes 0": ck("b2.safetensors", setk(("model", "num_classes"), 0)),
 "num_classes huge": ck("b3.safetensors", setk(("model", "num_classes"), 10**12)),
 "kwargs list": ck("b4.safetensors", setk(("model", "kwargs"), [1])),
 "kwargs unknown arg": ck("b5.safetensors", setk(("model", "kwargs"), {"nope": 1})),
 "spec int": ck("b6.safetensors", setk(("model", "spec"), 3)),
 "spec unknown name": ck("b7.safetensors", setk(("model", "spec"), "timm:no_such_model")),
 "spec empty": ck("b8.safetensors", setk(("model", "spec"), "")),
 "model missing": ck("b9.safetensors", setk(("model",), KeyError)),
 "sd string": ck("c1.safetensors", setk(("stochastic_depth",), "linear")),
 "mode missing": ck("c2.safetensors", setk(("stochastic_depth", "mode"), KeyError)),
 "mode bad": ck("c3.safetensors", setk(("stochastic_depth", "mode"), "row")),
 "drop_rate 2": ck("c4.safetensors", setk(("stochastic_depth", "drop_rate"), 2)),
 "drop_rate str": ck("c5.safetensors", setk(("stochastic_depth", "drop_rate"), "half")),
 "schedule wrong length": ck("c6.safetensors", setk(("stochastic_depth", "schedule"), [0.1, 0.2])),
 "schedule bad": ck("c7.safetensors", setk(("stochastic_depth", "schedule"), "cubic")),
 "include matches none": ck("c8.safetensors", setk(("stochastic_depth", "include"), ["zzz*"])),
 "seed str": ck("c9.safetensors", setk(("stochastic_depth", "seed"), "x")),
 "example_shape huge": ck("d1.safetensors", setk(("stochastic_depth", "example_shape"), [100000, 3, 10000, 10000])),
 "example_shape negative": ck("d2.safetensors", setk(("stochastic_depth", "example_shape"), [2, -3, 4])),
 "example_shape wrong rank": ck("d3.safetensors", setk(("stochastic_depth", "example_shape"), [2, 3, 7])),
 "format str": ck("d4.safetensors", setk(("format",), "1")),
 "format future": ck("d5.safetensors", setk(("format",), 99)),
 "converted str": ck("d6.safetensors", setk(("converted",), "yes")),
 "meta is array": ck("d7.safetensors", lambda m: (m.clear(),)),
 "tensors missing": ck("e1.safetensors", None, {"w": torch.zeros(1)}),
 "tensor wrong shape": ck("e2.safetensors", None, {**TENS, "fc.weight": torch.zeros(3, 3)}),
 "truncated": ck("e3.safetensors", raw=ok.read_bytes()[: ok.stat().st_size // 2]),
 "empty file": ck("e4.safetensors", raw=b""),
 "junk": ck("e5.safetensors", raw=b"\x00" * 100),
 "pickle named .safetensors": ck("e6.safetensors", raw=b"\x80\x04K\x01."),
}
(W / "dir.safetensors").mkdir(); files["a directory"] = W / "dir.safetensors"

results = []
def run(label, args):
    r = runner.invoke(app, [str(a) for a in args])
    lines = [l for l in (r.stderr or "").splitlines() if l.strip()]
    if r.exit_code in (0,):
        kind = "ok"
    elif r.exit_code in (2, 130) and len(lines) == 1 and "Traceback" not in r.output:
        kind = "one-line"
    else:
        kind = "TRACEBACK/OTHER"
    results.append((label, " ".join(args[:1]), r.exit_code, kind, lines[-1][:150] if lines else (repr(r.exception)[:150])))

for label, p in files.items():
    run(label, ["inspect", p])
    run(label, ["fold", p, "-o", W / "out.safetensors"])
    run(label, ["eval", p, "--dataset", "digits"])

def recipe(name, text):
    p = W / name; p.write_text(text); return p
rec = {
 "empty recipe": recipe("r1.yaml", ""),
 "recipe a list": recipe("r2.yaml", "- 1\n- 2\n"),
 "recipe bad yaml": recipe("r3.yaml", "model: {name: [\n"),
 "recipe code model": recipe("r4.yaml", f"model: {{name: 'subprocess:getoutput', kwargs: {{cmd: 'touch {MARK}'}}}}\n"),
 "recipe file.py model": recipe("r5.yaml", "model: {name: 'evil.py:f'}\n"),
 "recipe unknown key": recipe("r6.yaml", "train: {epoch: 3}\n"),
 "recipe epochs -1": recipe("r7.yaml", "train: {epochs: -1}\n"),
 "recipe lr str": recipe("r8.yaml", "optimizer: {lr: fast}\n"),
 "recipe lr nan": recipe("r9.yaml", "optimizer: {lr: .nan}\n"),
 "recipe dataset unknown": recipe("r10.yaml", "data: {dataset: mnist}\n"),
 "recipe cifar missing": recipe("r11.yaml", "data: {dataset: cifar10, data_dir: nowhere}\n"),
 "recipe imagefolder empty": recipe("r12.yaml", "data: {dataset: imagefolder, data_dir: emptydir}\n"),
 "recipe model unknown": recipe("r13.yaml", "model: {name: resnet5}\ntrain: {epochs: 1}\n"),
 "recipe weights missing": recipe("r14.yaml", "model: {weights: nowhere.safetensors}\n"),
 "recipe batch 0": recipe("r15.yaml", "train: {batch_size: 0}\n"),
 "recipe mean wrong": recipe("r16.yaml", "data: {mean: [a, b, c]}\n"),
 "recipe sections null": recipe("r17.yaml", "train:\n"),
}
(W / "emptydir").mkdir()
for label, p in rec.items():
    run(label, ["finetune", p, "--set", f"train.output_dir={W/'runs'/label.replace(' ', '_')}"])
for label, args in {
  "--set malformed": ["finetune", rec["recipe unknown key"], "--set", "train"],
  "--set not a section": ["finetune", rec["recipe epochs -1"], "--set", "train.epochs.x=1"],
  "--resume nowhere": ["finetune", rec["recipe epochs -1"], "--resume", W / "nowhere"],
  "missing recipe": ["finetune", W / "none.yaml"],
  "bench tpu": ["bench", "resnet18", "--device", "tpu"],
  "bench cuda": ["bench", "resnet18", "--device", "cuda"],
  "bench batch 0": ["bench", "resnet18", "--batch-size", "0"],
  "bench steps 0": ["bench", "resnet18", "--steps", "0"],
  "bench dtype": ["bench", "resnet18", "--dtype", "fp8"],
  "convert code spec from the command line is allowed: unknown module": ["convert", "nosuchpkg:fn", "-o", W / "x.safetensors"],
  "convert unknown model": ["convert", "resnet5", "-o", W / "x.safetensors"],
  "convert weights missing": ["convert", "resnet18", "--weights", W / "none.pt", "-o", W / "x.safetensors"],
  "convert pickle weights": ["convert", "resnet18", "--weights", W / "evil.pt", "-o", W / "x.safetensors"],
  "convert image-size 0": ["convert", "resnet18", "--no-pretrained", "--image-size", "0", "-o", W / "x.safetensors"],
  "convert num-classes -1": ["convert", "resnet18", "--no-pretrained", "--num-classes", "-1", "-o", W / "x.safetensors"],
  "convert pretrained offline": ["convert", "resnet18", "-o", W / "x.safetensors"],
  "convert -o no dir": ["convert", "resnet18", "--no-pretrained", "-o", W / "no" / "x.safetensors"],
  "fold -o same": ["fold", ok, "-o", ok],
  "eval image-size 0": ["eval", ok, "--dataset", "digits", "--image-size", "0"],
  "eval unknown dataset": ["eval", ok, "--dataset", "mnist"],
  "eval cifar missing": ["eval", ok, "--dataset", "cifar10", "--data-dir", W / "nowhere"],
  "inspect unknown": ["inspect", "resnet5"],
  "inspect --arg bad": ["inspect", "resnet18", "--arg", "x"],
}.items():
    if label == "convert pickle weights":
        class P:
            def __reduce__(self): return (Path.touch, (MARK,))
        torch.save({"state_dict": {"x": P()}}, W / "evil.pt")
    run(label, args)

# fine-tuning faults: divergence, hostile and damaged run directories
good = recipe("good.yaml", f"data: {{dataset: digits, image_size: 8}}\ntrain: {{epochs: 1, batch_size: 64, "
              f"max_steps_per_epoch: 3, output_dir: {W / 'runs' / 'good'}}}\n")
run("a good run", ["finetune", good])
run("lr 1e6 diverges", ["finetune", good, "--set", "optimizer.lr=1000000.0", "--set", "train.epochs=3",
                        "--set", f"train.output_dir={W / 'runs' / 'div'}"])
gdir = W / "runs" / "good"


class Payload:
    def __reduce__(self):
        return (Path.touch, (MARK,))


for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
    for d in (gdir / "checkpoints").iterdir():
        torch.save({"x": Payload()}, d / name)
run("resume with planted pickles", ["finetune", good, "--resume", gdir, "--set", "train.epochs=2"])
for f in (gdir / "checkpoints" / "epoch_2").iterdir():
    f.write_bytes(f.read_bytes()[:10])
run("resume, newest checkpoint truncated", ["finetune", good, "--resume", gdir, "--set", "train.epochs=3"])
for d in (gdir / "checkpoints").iterdir():
    for f in d.iterdir():
        torch.save({"x": Payload()}, f)
run("resume, every checkpoint file a pickle", ["finetune", good, "--resume", gdir, "--set", "train.epochs=4"])

from collections import Counter  # noqa: E402
for r in results:
    if r[3] != "one-line":
        print(r)
c = Counter(r[3] for r in results)
print(len(results), "tried;", dict(c), "; code executed:", MARK.exists())
json.dump(results, open(W / "results.json", "w"), indent=1)
print(f"details: {W / 'results.json'}")
