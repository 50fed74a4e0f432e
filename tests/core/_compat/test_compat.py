"""core/_compat: every hook applies to the locked libraries, and degrades (never breaks) when its target moves.

Real transformers/PEFT/tokenizers throughout. A target going missing or changing is simulated by taking the
target attribute away (or pointing the hook at a name that does not exist) with monkeypatch; the feature must
then still work through the library's plain path, with a warning logged. The libraries' deprecation warnings
are errors here: they are how a move of the internals patched here is announced.
"""

from __future__ import annotations

import logging
import threading
import types

import factories
import pytest
import torch

from lora_studio.core import _compat
from lora_studio.core._compat import bnb_cpu_unpack, peft_config, peft_mixed_batch, swap, tokenizer_swap, tqdm_progress
from lora_studio.core.model import tokenizer_parse
from lora_studio.core.model.loading import load_base, load_model, load_tokenizer
from lora_studio.core.model.sources import resolve_source

pytestmark = [
    # The last filter wins: PEFT 0.21's PeftModel.__init__ reads transformers' deprecated is_gradient_checkpointing
    # (PEFT's own code, nothing patched here); every other deprecation is an error.
    pytest.mark.filterwarnings(
        "error::FutureWarning",
        "error::DeprecationWarning",
        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(autouse=True)
def fresh_warnings():
    swap.forget_warnings()
    yield
    swap.forget_warnings()


def compat_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("lora_studio.core._compat") and r.levelno == logging.WARNING
    ]


# -- self_check ----------------------------------------------------------------------------------------------------


def test_self_check_lists_every_hook_as_active():
    report = _compat.self_check()
    for module in (tqdm_progress, tokenizer_swap, peft_mixed_batch, peft_config):  # every hook answers
        assert module.__name__.rsplit(".", 1)[1] in _compat.HOOK_MODULES
        assert module.checks() and set(module.checks()) <= set(report)
    inactive = {hook: state for hook, state in report.items() if state != _compat.ACTIVE}
    assert not inactive, f"hooks that no longer apply to the installed libraries: {inactive}"


def test_self_check_names_the_reason_a_hook_is_inactive(monkeypatch):
    monkeypatch.setattr(tqdm_progress, "SITES", (("transformers.core_model_loading", "tqdm_renamed"),))
    monkeypatch.setattr(peft_config, "LOCKED_PEFT_VERSION", "0.0.0")
    report = _compat.self_check()
    assert "no 'tqdm_renamed'" in report["transformers.core_model_loading.tqdm_renamed"]
    assert "0.0.0" in report["peft.LoraConfig fields"]


# -- the swap helper -------------------------------------------------------------------------------------------------


def _target_module():
    module = types.ModuleType("compat_target")
    module.value = lambda: "original"
    return module


def test_swap_restores_the_original_after_an_exception():
    module = _target_module()
    original = module.value
    with pytest.raises(ValueError), swap.swapped(module, "value", lambda: "ours"):
        assert module.value() == "ours"
        raise ValueError("boom")
    assert module.value is original
    assert not swap.is_swapped_in(module, "value")


def test_swap_of_a_missing_attribute_changes_nothing():
    module = _target_module()
    with pytest.raises(AttributeError), swap.swapped(module, "gone", lambda: "ours"):
        pass
    assert not hasattr(module, "gone")


def test_swap_is_seen_by_the_calling_thread_only():
    module = _target_module()
    inside, seen = threading.Event(), {}
    release = threading.Event()

    def other_thread() -> None:
        inside.wait(10)
        seen["other"] = module.value()
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with swap.swapped(module, "value", lambda: "ours"):
        inside.set()
        release.wait(10)
        seen["caller"] = module.value()
    thread.join(10)
    assert seen == {"other": "original", "caller": "ours"}
    assert module.value() == "original"


def test_concurrent_swaps_each_see_their_own_and_the_last_one_restores():
    module = _target_module()
    original = module.value
    both_inside = threading.Barrier(2, timeout=10)
    first_left = threading.Event()
    seen: dict[str, list[str]] = {}

    def run(name: str, leave_first: bool) -> None:
        with swap.swapped(module, "value", lambda: name):
            both_inside.wait()
            seen[name] = [module.value()]
            if leave_first:
                return
            first_left.wait(10)
            seen[name].append(module.value())  # still ours after the other thread put its swap away
        first_left.set()

    def leave_first() -> None:
        try:
            run("a", True)
        finally:
            first_left.set()

    threads = [threading.Thread(target=leave_first), threading.Thread(target=run, args=("b", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"a": ["a"], "b": ["b", "b"]}
    assert module.value is original


def test_swap_of_an_inherited_method_binds_and_is_removed_afterwards():
    class Base:
        def greet(self, who: str) -> str:
            return f"hello {who}"

    class Child(Base):
        pass

    def ours(self, who: str) -> str:
        return f"ahoy {who} from {type(self).__name__}"

    with swap.swapped(Child, "greet", ours):
        assert Child().greet("x") == "ahoy x from Child"
        assert Base().greet("x") == "hello x"
    assert "greet" not in vars(Child) and Child().greet("x") == "hello x"


# -- tqdm progress ---------------------------------------------------------------------------------------------------


def _load_with_progress(tiny_llama):
    seen = []
    model, _ = load_base(resolve_source(str(tiny_llama)), report=seen.append)
    return model, [p for p in seen if p.unit == "tensors"]


def test_load_reports_each_tensor_and_puts_tqdm_back(tiny_llama):
    import transformers.core_model_loading as loading_module

    original = loading_module.tqdm
    model, per_tensor = _load_with_progress(tiny_llama)
    assert per_tensor and per_tensor[-1].message == "loading weights" and per_tensor[-1].done == per_tensor[-1].total
    assert loading_module.tqdm is original
    assert model is not None


def test_load_works_when_the_gguf_tqdm_is_gone(tiny_llama, monkeypatch, caplog):
    import transformers.modeling_gguf_pytorch_utils as gguf_module

    monkeypatch.delattr(gguf_module, "tqdm")
    caplog.set_level(logging.WARNING)
    _, per_tensor = _load_with_progress(tiny_llama)
    assert per_tensor  # the weights loop is still hooked
    assert any("modeling_gguf_pytorch_utils.tqdm" in m and "inactive" in m for m in compat_warnings(caplog))


def test_load_works_with_stage_progress_when_the_loop_moved(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(
        tqdm_progress,
        "SITES",
        (("transformers.core_model_loading", "tqdm_renamed"), ("transformers.a_module_that_moved", "tqdm")),
    )
    caplog.set_level(logging.WARNING)
    model, per_tensor = _load_with_progress(tiny_llama)
    assert model is not None and per_tensor == []
    messages = compat_warnings(caplog)
    assert len(messages) == 2 and all("using the library's plain path" in m for m in messages)
    _load_with_progress(tiny_llama)
    assert len(compat_warnings(caplog)) == 2  # once per hook, not once per load


# -- tokenizer parsing -----------------------------------------------------------------------------------------------


def _counting_parser(calls: list):
    return lambda path: calls.append(path) or tokenizer_parse.parse_tokenizer_file(path)


def test_tokenizer_is_parsed_by_ours_and_transformers_is_put_back(tiny_llama):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from transformers import tokenization_utils_tokenizers as module

    calls: list = []
    with tokenizer_swap.tokenizer_files_parsed_by(_counting_parser(calls)):
        ours = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert calls and module.TokenizerFast is Tokenizer
    assert isinstance(ours.backend_tokenizer, Tokenizer)
    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert ours.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()


def _assert_plain_tokenizer(tokenizer, tiny_llama) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert tokenizer.backend_tokenizer.to_str() == plain.backend_tokenizer.to_str()
    assert tokenizer("hello <|im_end|>")["input_ids"] == plain("hello <|im_end|>")["input_ids"]


def test_load_tokenizer_works_when_the_tokenizer_module_moved(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(tokenizer_swap, "MODULE", "transformers.tokenization_moved_away")
    calls: list = []
    real = tokenizer_parse._build_bpe_in_steps
    monkeypatch.setattr(tokenizer_parse, "_build_bpe_in_steps", lambda path: calls.append(path) or real(path))
    caplog.set_level(logging.WARNING)
    tokenizer = load_tokenizer(resolve_source(str(tiny_llama)))  # was a UserError before core/_compat
    _assert_plain_tokenizer(tokenizer, tiny_llama)
    assert not calls
    assert any("tokenizer parsing" in m and "tokenization_moved_away" in m for m in compat_warnings(caplog))


def test_load_tokenizer_works_when_the_tokenizer_name_changed(tiny_llama, monkeypatch, caplog):
    from tokenizers import Tokenizer
    from transformers import tokenization_utils_tokenizers as module

    class OtherTokenizerClass:  # what a transformers release might bind that name to instead
        from_file = staticmethod(Tokenizer.from_file)
        from_str = staticmethod(Tokenizer.from_str)

        def __new__(cls, *args, **kwargs):
            return Tokenizer(*args, **kwargs)

    monkeypatch.setattr(module, "TokenizerFast", OtherTokenizerClass)
    calls: list = []
    real = tokenizer_parse._build_bpe_in_steps
    monkeypatch.setattr(tokenizer_parse, "_build_bpe_in_steps", lambda path: calls.append(path) or real(path))
    caplog.set_level(logging.WARNING)
    tokenizer = load_tokenizer(resolve_source(str(tiny_llama)))
    _assert_plain_tokenizer(tokenizer, tiny_llama)
    assert not calls and module.TokenizerFast is OtherTokenizerClass
    assert any("no longer tokenizers.Tokenizer" in m for m in compat_warnings(caplog))


# -- PEFT mixed batches ----------------------------------------------------------------------------------------------

NAMES = ["__base__", "__base__", "alpha", "alpha", "beta"]


@pytest.fixture(scope="module")
def mixed_model(tiny_llama, llama_adapters):
    return factories.peft_model(tiny_llama, llama_adapters)


def _logits(model, names=NAMES):
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (1, 7)).repeat(len(names), 1)
    with torch.inference_mode():
        return model(input_ids=ids, adapter_names=names).logits


def _counting_sliced_forward(monkeypatch) -> list:
    calls: list = []
    real = peft_mixed_batch._sliced_mixed_forward
    monkeypatch.setattr(peft_mixed_batch, "_sliced_mixed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_mixed_batch_hook_applies_and_matches_peft(mixed_model, monkeypatch):
    from peft.tuners.lora import Linear

    plain = _logits(mixed_model)
    calls = _counting_sliced_forward(monkeypatch)
    names = list(NAMES)
    with peft_mixed_batch.contiguous_sub_batches(names):
        hooked = _logits(mixed_model, names)
        other = _logits(mixed_model, ["beta", "__base__", "alpha", "alpha", "__base__"])  # not our list: PEFT's own
    assert calls
    assert torch.allclose(plain, hooked, atol=1e-5)
    assert "_mixed_batch_forward" not in vars(Linear)
    assert torch.allclose(other[1], plain[0], atol=1e-5) and torch.allclose(other[0], plain[4], atol=1e-5)


def test_mixed_batch_works_when_the_layer_class_is_gone(mixed_model, monkeypatch, caplog):
    import peft.tuners.lora

    plain = _logits(mixed_model)
    monkeypatch.delattr(peft.tuners.lora, "Linear")
    calls = _counting_sliced_forward(monkeypatch)
    caplog.set_level(logging.WARNING)
    names = list(NAMES)
    with peft_mixed_batch.contiguous_sub_batches(names):
        hooked = _logits(mixed_model, names)
    assert not calls and torch.allclose(plain, hooked, atol=1e-5)
    assert any("mixed-batch" in m and "no Linear" in m for m in compat_warnings(caplog))


def test_mixed_batch_works_when_peft_changed_the_signature(mixed_model, monkeypatch, caplog):
    from peft.tuners.lora import LoraLayer

    original = LoraLayer._mixed_batch_forward

    def changed(self, x, *args, adapter_names, new_option=None, **kwargs):  # a release with a new parameter
        return original(self, x, *args, adapter_names=adapter_names, **kwargs)

    plain = _logits(mixed_model)
    monkeypatch.setattr(LoraLayer, "_mixed_batch_forward", changed)
    calls = _counting_sliced_forward(monkeypatch)
    caplog.set_level(logging.WARNING)
    names = list(NAMES)
    with peft_mixed_batch.contiguous_sub_batches(names):
        hooked = _logits(mixed_model, names)
    assert not calls and torch.allclose(plain, hooked, atol=1e-5)
    assert any("another signature" in m for m in compat_warnings(caplog))


# -- PEFT config fields ----------------------------------------------------------------------------------------------


def test_config_keys_are_checked_against_peft_when_another_version_is_installed(llama_adapters, monkeypatch, caplog):
    from lora_studio.core.adapters.files import read_adapter_config

    monkeypatch.setattr(peft_config, "LOCKED_PEFT_VERSION", "0.0.0")
    calls: list = []
    real = peft_config.peft_config_fields
    monkeypatch.setattr(peft_config, "peft_config_fields", lambda: calls.append(1) or real())
    caplog.set_level(logging.WARNING)
    assert peft_config.unknown_config_keys({"r": 8, "peft_type": "LORA"}) == []
    assert read_adapter_config(llama_adapters["alpha"]).r == 4
    assert calls
    assert any("PEFT config field list" in m and "0.0.0" in m for m in compat_warnings(caplog))


# -- ggml's quantiser ------------------------------------------------------------------------------------------------


def _rows_to_quantise():
    import numpy as np

    rows = np.random.default_rng(3).standard_normal((600, 96)).astype(np.float32)  # blocks cross no row: 96 = 3 x 32
    rows[7] = 0.0
    rows[9, 5] = np.nan  # a NaN row: written as gguf-py writes it
    return rows


@pytest.mark.parametrize("type_name", ["Q8_0", "BF16"])
def test_ggml_quantiser_writes_gguf_pys_bytes_eager_and_lazy(type_name):
    import gguf
    import numpy as np
    from gguf.lazy import LazyNumpyTensor

    from lora_studio.core._compat import ggml_quantize

    qtype = getattr(gguf.GGMLQuantizationType, type_name)
    rows = _rows_to_quantise()
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(rows, qtype)
        with ggml_quantize.ggml_quantisers():
            assert swap.is_swapped_in(gguf.quants, "quantize")
            eager = gguf.quants.quantize(rows, qtype)
            lazy = gguf.quants.quantize(LazyNumpyTensor.from_eager(rows), qtype)
            odd = gguf.quants.quantize(rows[:, :40], gguf.GGMLQuantizationType.F16)  # not ours: gguf-py's
        assert not swap.is_swapped_in(gguf.quants, "quantize")
        assert isinstance(lazy, LazyNumpyTensor) and lazy.shape == expected.shape
        assert eager.tobytes() == expected.tobytes() == LazyNumpyTensor.to_eager(lazy).tobytes()
        assert odd.dtype == np.float16


def test_ggml_quantiser_falls_back_to_gguf_py_when_ggml_is_missing(monkeypatch, caplog):
    import gguf
    import numpy as np

    from lora_studio.core._compat import ggml_quantize

    def missing():
        raise OSError("libggml-base.so: cannot open shared object file")

    ggml_quantize._inactive_reason.cache_clear()
    monkeypatch.setattr(ggml_quantize, "_ggml_quantize_chunk", missing)
    caplog.set_level(logging.WARNING)
    try:
        rows, qtype = _rows_to_quantise()[:64], gguf.GGMLQuantizationType.Q8_0
        with np.errstate(all="ignore"), ggml_quantize.ggml_quantisers():
            assert not swap.is_swapped_in(gguf.quants, "quantize")
            assert gguf.quants.quantize(rows, qtype).tobytes() == gguf.quants.quantize(rows, qtype).tobytes()
        assert "cannot open shared object" in ggml_quantize.checks()[ggml_quantize.TARGET]
        assert any("ggml quantiser" in m and "plain path" in m for m in compat_warnings(caplog))
    finally:
        ggml_quantize._inactive_reason.cache_clear()


# -- gguf_reader ---------------------------------------------------------------------------------------------------


def _demo_gguf():
    from lora_studio.core.demo.model import demo_gguf_path

    path = demo_gguf_path()
    assert path is not None, "the demo model is not installed (make install)"
    return path


def _read(path):
    """Every field's parts and every tensor's name, type and bytes, as gguf's reader gives them."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: (f.types, f.data, [bytes(part) for part in f.parts]) for name, f in reader.fields.items()}
    tensors = [(t.name, t.tensor_type, list(t.shape), t.data.tobytes()) for t in reader.tensors]
    return fields, tensors


def test_a_gguf_is_read_the_same_through_the_plain_view_and_gguf_is_put_back():
    import gguf
    import numpy as np

    from lora_studio.core._compat import gguf_reader

    path = _demo_gguf()
    expected = _read(path)
    with gguf_reader.fast_gguf_reads():
        assert swap.is_swapped_in(gguf.GGUFReader, "_get")
        fields, tensors = _read(path)
        reader = gguf.GGUFReader(str(path))
        assert type(reader.tensors[0].data) is not np.memmap and reader.tensors[0].data.base is not None  # a view
    assert not swap.is_swapped_in(gguf.GGUFReader, "_get")
    assert (fields, tensors) == expected and len(fields["tokenizer.ggml.tokens"][1]) == 49_152


def test_a_gguf_is_read_by_gguf_itself_when_its_reader_changed(monkeypatch, caplog):
    import gguf

    from lora_studio.core._compat import gguf_reader

    original = gguf.GGUFReader._get

    def changed(self, offset, dtype, count=1, override_order=None):
        return original(self, offset, dtype, count, override_order)

    monkeypatch.setattr(gguf.GGUFReader, "_get", changed)
    caplog.set_level(logging.WARNING)
    path = _demo_gguf()
    with gguf_reader.fast_gguf_reads():
        assert not swap.is_swapped_in(gguf.GGUFReader, "_get")
        fields, _ = _read(path)
    assert len(fields["tokenizer.ggml.tokens"][1]) == 49_152
    assert "no longer does" in gguf_reader.checks()[gguf_reader.TARGET]
    assert any("GGUF metadata reading" in m and "plain path" in m for m in compat_warnings(caplog))


# -- bitsandbytes' CPU 4-bit unpacking -------------------------------------------------------------------------------


def _packed_4bit_layer():
    """A 64x128 NF4 Linear4bit whose weight is in bitsandbytes' CPU layout, as its first inference forward leaves it
    on a CPU with AVX512-BF16 (packed here by the same function, so on any CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    modules = bnb.nn.modules
    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(
        128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4"
    )
    layer.load_state_dict(plain.state_dict())
    layer = layer.to("cpu").eval()  # quantises
    weight = layer.weight
    weight.data, weight.quant_state = modules._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    return modules, layer


def _repacked(modules, layer):
    weight = layer.weight
    weight.data, weight.quant_state = modules._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    return weight.data.clone(), weight.quant_state.absmax.clone()


def test_a_4bit_layer_keeps_its_block_scales_through_a_state_dict():
    modules, layer = _packed_4bit_layer()
    packed, scales = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    with bnb_cpu_unpack.block_scales_restored():
        saved = layer.state_dict()
    assert not swap.is_swapped_in(modules, bnb_cpu_unpack.NAME)
    assert saved["weight.absmax"].shape == (64 * 128 // 64,) and saved["weight.absmax"].dtype == torch.float32
    again, again_scales = _repacked(modules, layer)
    assert torch.equal(again, packed) and torch.equal(again_scales, scales)


def test_bitsandbytes_alone_scrambles_the_block_scales_through_a_state_dict():
    """What the hook is for: if this fails, bitsandbytes restores the scales itself and the hook does nothing."""
    modules, layer = _packed_4bit_layer()
    packed, scales = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    layer.state_dict()
    again, again_scales = _repacked(modules, layer)
    assert torch.equal(again, packed) and not torch.equal(again_scales, scales)


def test_no_4bit_layer_is_packed_for_the_inference_kernel_while_a_run_trains():
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes packs 4-bit weights for the CPU only with AVX512-BF16")
    modules, layer = _packed_4bit_layer()
    weight = layer.weight
    weight.data, weight.quant_state = modules._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    with torch.no_grad(), bnb_cpu_unpack.packing_off():
        layer(torch.randn(3, 128))  # an evaluation: inference, outside training mode
        assert not layer.weight.quant_state.packing_format_for_cpu
    assert not swap.is_swapped_in(modules, bnb_cpu_unpack.PACK)
    with torch.no_grad():
        layer(torch.randn(3, 128))
    assert layer.weight.quant_state.packing_format_for_cpu  # outside, bitsandbytes packs as it always does


def test_a_4bit_layer_computes_the_same_after_a_state_dict_on_a_cpu_that_packs():
    bnb = pytest.importorskip("bitsandbytes")
    if not bnb.functional.has_avx512bf16():
        pytest.skip("bitsandbytes packs 4-bit weights for the CPU only with AVX512-BF16")
    _, layer = _packed_4bit_layer()
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = layer(x)
        with bnb_cpu_unpack.block_scales_restored():
            layer.state_dict()
        assert not layer.weight.quant_state.packing_format_for_cpu
        after = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu and torch.equal(before, after)


def test_state_dict_works_when_bitsandbytes_moved_the_unpacking(monkeypatch, caplog):
    _, layer = _packed_4bit_layer()
    monkeypatch.setattr(bnb_cpu_unpack, "NAME", "_convert_weight_packed_for_cpu_inverse_renamed")
    assert (
        "no _convert_weight_packed_for_cpu_inverse_renamed"
        in _compat.self_check()["bitsandbytes.nn.modules._convert_weight_packed_for_cpu_inverse_renamed"]
    )
    caplog.set_level(logging.WARNING)
    with bnb_cpu_unpack.block_scales_restored():
        saved = layer.state_dict()  # bitsandbytes' own unpacking
    assert "weight.absmax" in saved and not layer.weight.quant_state.packing_format_for_cpu
    assert any("CPU 4-bit unpacking" in m and "renamed" in m for m in compat_warnings(caplog))


def test_state_dict_works_when_bitsandbytes_changed_the_signature(monkeypatch, caplog):
    modules, layer = _packed_4bit_layer()
    original = modules._convert_weight_packed_for_cpu_inverse

    def changed(packed_weight, quant_state, block_n=32, *, new_option=None):  # a release with a new parameter
        return original(packed_weight, quant_state, block_n)

    monkeypatch.setattr(modules, "_convert_weight_packed_for_cpu_inverse", changed)
    caplog.set_level(logging.WARNING)
    with bnb_cpu_unpack.block_scales_restored():
        layer.state_dict()
    assert not swap.is_swapped_in(modules, bnb_cpu_unpack.NAME)
    assert any("another signature" in m for m in compat_warnings(caplog))


def test_an_init_reports_each_layer_it_adapts_and_cancels_between_them(tiny_llama, monkeypatch, caplog):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraModel

    from lora_studio.core._compat import peft_init_progress
    from lora_studio.core.errors import Cancelled
    from lora_studio.core.tasks import CancelToken

    config = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="olora")
    reports: list = []
    model = load_model(resolve_source(tiny_llama))
    with peft_init_progress.reporting_layers(4, "adding the adapter", CancelToken(), reports.append):
        get_peft_model(model, LoraConfig(**config))
    assert [p.message for p in reports] == [f"adding the adapter: layer {n}/4" for n in range(5)]
    assert not swap.is_swapped_in(LoraModel, "_create_and_replace")

    token = CancelToken()

    def cancel_after_one(progress):
        if progress.done == 1:
            token.cancel()

    model = load_model(resolve_source(tiny_llama))
    with pytest.raises(Cancelled), peft_init_progress.reporting_layers(4, "init", token, cancel_after_one):
        get_peft_model(model, LoraConfig(**config))
    # PEFT moved on: the init runs without the count, and says so once
    monkeypatch.setattr(peft_init_progress, "EXPECTED", ("self", "gone"))
    caplog.set_level(logging.WARNING)
    reports.clear()
    model = load_model(resolve_source(tiny_llama))
    with peft_init_progress.reporting_layers(4, "init", CancelToken(), reports.append):
        get_peft_model(model, LoraConfig(**config))
    assert not reports and any("PEFT init progress" in m for m in compat_warnings(caplog))
