"""The decoding settings box shared by Compare and Try it: sampling, temperature, max new tokens, seed."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QSpinBox,
    QWidget,
)

from lora_studio.core.generation.generate import MAX_NEW_TOKENS_LIMIT, GenerationSettings


class DecodingBox(QGroupBox):
    """Greedy or sampling, and how many tokens: the same for every column."""

    def __init__(self, parent: QWidget | None = None, *, batching: bool = False) -> None:
        """``batching``: the box also offers "one at a time" (Compare's columns; Try it runs one variant)."""
        super().__init__("Decoding (same for every column)", parent)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["greedy", "sampling"])
        self.mode_combo.setToolTip("greedy is deterministic; sampling seeds every column with the same seed")
        self.mode_combo.currentIndexChanged.connect(lambda *_: self._update_enabled())
        self.temperature = QDoubleSpinBox(minimum=0.01, maximum=5.0, singleStep=0.05, value=0.7, decimals=2)
        self.top_p = QDoubleSpinBox(minimum=0.01, maximum=1.0, singleStep=0.05, value=0.95, decimals=2)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.max_tokens = QSpinBox(minimum=1, maximum=MAX_NEW_TOKENS_LIMIT, value=64)
        self.one_at_a_time = QCheckBox("one at a time")
        self.one_at_a_time.setToolTip(
            "run each variant alone instead of in one mixed batch: slower; exact in bfloat16 and float16, where a "
            "batch can round differently (in float32 both give the same tokens)"
        )
        form = QFormLayout(self)
        form.addRow("mode", self.mode_combo)
        form.addRow("temperature", self.temperature)
        form.addRow("top-p", self.top_p)
        form.addRow("seed", self.seed)
        form.addRow("max new tokens", self.max_tokens)
        if batching:
            form.addRow(self.one_at_a_time)
        else:
            self.one_at_a_time.hide()
        self._update_enabled()

    def _update_enabled(self) -> None:
        sampling = self.mode_combo.currentText() == "sampling"
        for w in (self.temperature, self.top_p, self.seed):
            w.setEnabled(sampling)

    def settings(self, use_chat_template: bool) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_tokens.value(),
            do_sample=self.mode_combo.currentText() == "sampling",
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            seed=self.seed.value(),
            use_chat_template=use_chat_template,
        )
