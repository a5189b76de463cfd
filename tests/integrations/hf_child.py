"""Run by test_hf_export in a fresh interpreter (``python -I -S``) where moeut cannot be imported.

Argument: a JSON file with ``paths`` (site-packages holding torch and transformers, but not moeut), ``export``
(the exported directory), ``inputs`` (a torch file with the expected outputs), ``result`` (where to write the
JSON result). Loads the export with transformers and remote code only, and compares.
"""

import json
import sys

job = json.load(open(sys.argv[1]))
sys.path.extend(job["paths"])
if job.get("block_moeut"):  # moeut installed non-editable into the same site-packages: make it unimportable
    sys.modules["moeut"] = None

result = {}
try:
    import moeut  # noqa: F401

    result["moeut_importable"] = True
except ImportError:
    result["moeut_importable"] = False

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

result["transformers"] = transformers.__version__

data = torch.load(job["inputs"], weights_only=True)
model = AutoModelForCausalLM.from_pretrained(job["export"], trust_remote_code=True)
model.eval()
result["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
result["dtype"] = str(model.dtype)
with torch.no_grad():
    out = model(input_ids=data["tokens"], attention_mask=data["mask"], output_router_logits=True)
result["logits_max_abs_err"] = (out.logits - data["logits"]).abs().max().item()
result["aux_loss_err"] = abs(out.aux_loss.item() - data["reg_loss"].item())

eos = int(data["eos_id"])
gen = model.generate(input_ids=data["prompt_tokens"], attention_mask=data["prompt_mask"],
                     max_new_tokens=int(data["max_new_tokens"]), do_sample=False)
rows = []
for row in gen[:, data["prompt_tokens"].shape[1]:].tolist():
    if eos in row:  # moeut stops a row at EOS (included); transformers pads it afterwards
        row = row[:row.index(eos) + 1]
    rows.append(row)
result["greedy"] = rows

tok = AutoTokenizer.from_pretrained(job["export"])
result["tokenizer_class"] = type(tok).__name__
result["encoded"] = [tok(t)["input_ids"] for t in job["texts"]]
result["decoded"] = [tok.decode(ids) for ids in job["sp_ids"]]
result["modules_with_moeut"] = sorted(m for m, mod in sys.modules.items()
                                     if (m == "moeut" or m.startswith("moeut.")) and mod is not None)
with open(job["result"], "w") as f:
    json.dump(result, f)
