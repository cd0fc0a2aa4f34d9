"""``load_adapter`` names every adapter the same way (issue 16, bug 4): ``name=`` when given, else
the folder's name, whether the model is plain (the first load wraps it) or a peft model already.
It used to call the first one "default", so ``set_adapter(model, "answer")`` failed.

Oracle: peft's own ``PeftModel.from_pretrained`` / ``load_adapter`` with the same names."""

from __future__ import annotations

import pytest
import torch
from lora_testing import randomize_lora
from peft import PeftModel

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.hf.adapters.io import adapter_name_for

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base():
    return ll.load_model("builtin:tiny", device="cpu")[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two adapters saved in folders "answer" and "style" (B random, so they differ)."""
    root = tmp_path_factory.mktemp("named")
    out = {}
    for i, (folder, targets) in enumerate((("answer", "all-linear"), ("style", "mlp"))):
        pm = ll.attach(base(), ll.AdapterSpec(r=4, target_modules=targets), name="tmp")
        randomize_lora(pm, "tmp", seed=i + 1)
        out[folder] = ll.save_adapter(pm, root / folder)
    return out


def test_first_and_later_adapters_take_their_folder_names(saved):
    model = ll.load_adapter(base(), saved["answer"])          # a plain model: wrapped here
    assert list(model.peft_config) == ["answer"] and ll.active_adapter(model) == "answer"
    model = ll.load_adapter(model, saved["style"])            # a peft model: added
    assert list(model.peft_config) == ["answer", "style"] and ll.active_adapter(model) == "style"
    assert set(model.lora_lab_specs) == set(model.lora_lab_sources) == {"answer", "style"}
    ref = PeftModel.from_pretrained(base(), str(saved["answer"]), adapter_name="answer")
    ref.load_adapter(str(saved["style"]), adapter_name="style")
    for name in ("answer", "style"):
        ll.set_adapter(model, name)                            # used to fail for "answer"
        ref.set_adapter(name)
        torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=1e-6)
    assert ll.list_adapters(model)["name"].tolist() == ["answer", "style"]


def test_name_is_used_on_plain_and_peft_models_alike(saved, tmp_path):
    model = ll.load_adapter(base(), saved["answer"], name="qa")
    model = ll.load_adapter(model, saved["style"], name="tone")
    assert list(model.peft_config) == ["qa", "tone"]
    # a folder path written with a trailing separator or "." names the folder itself
    assert adapter_name_for(str(saved["style"]) + "/") == "style"
    assert adapter_name_for(saved["style"] / ".") == "style"
    assert adapter_name_for(saved["style"], "mine") == "mine"


@pytest.mark.parametrize("folder, suggestion", [("v1.2", "v1_2"), ("train", "train_adapter")])
def test_a_folder_name_that_cannot_name_an_adapter_asks_for_name(saved, tmp_path, folder,
                                                                 suggestion):
    """Adapter names are keys of torch ModuleDicts: no dots, not a method name ("train", "to")."""
    import shutil

    path = tmp_path / folder
    shutil.copytree(saved["answer"], path)
    for model in (base(), ll.load_adapter(base(), saved["style"])):
        with pytest.raises(AdapterError, match=rf"(?s)folder name '{folder}'.*name='{suggestion}'"):
            ll.load_adapter(model, path)
    model = ll.load_adapter(base(), path, name=suggestion)    # the suggested fix works
    assert list(model.peft_config) == [suggestion]
