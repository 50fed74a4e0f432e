"""The Compare tab's inputs: the prompt (typed, or picked from a loaded list) and the decoding settings."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from lora_studio.core.generation.generate import MAX_NEW_TOKENS_LIMIT, GenerationSettings

MAX_PROMPT_LABEL = 80  # characters of a prompt shown in the selector


class PromptBox(QWidget):
    """The prompt box, the selector of a loaded prompt list, 'Load prompts…' and the chat-template toggle."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.prompts: list[str] = []
        self.edit = QPlainTextEdit()
        self.edit.setPlaceholderText("a prompt to send to every ticked variant… (Ctrl+Enter runs)")
        self.edit.setTabChangesFocus(True)  # Tab moves on to the next control; a prompt rarely needs a tab character
        self.edit.setFixedHeight(60)
        self.select = QComboBox()
        self.select.setToolTip("prompts from the loaded file; the chosen one goes into the box")
        self.select.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.select.setMinimumContentsLength(30)
        self.select.currentIndexChanged.connect(self._picked)
        self.select.hide()
        self.load_btn = QPushButton("Load prompts…")
        self.load_btn.setToolTip('a .txt file (one prompt per line) or .jsonl ({"prompt": ...} per line)')
        self.chat_check = QCheckBox("chat template")
        self.chat_check.setChecked(True)
        self.chat_check.setToolTip("wrap the prompt in the tokenizer's chat template; off: the text is fed as is")
        top = QHBoxLayout()
        top.addWidget(QLabel("Prompt"))
        top.addWidget(self.select, 1)
        top.addStretch(0)
        top.addWidget(self.load_btn)
        top.addWidget(self.chat_check)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.edit)

    def text(self) -> str:
        return self.edit.toPlainText()

    def set_prompts(self, prompts: list[str], labels: list[str] | None = None) -> None:
        """Fill the prompt selector; the first prompt goes into the box."""
        self.prompts = list(prompts)
        self.select.blockSignals(True)
        self.select.clear()
        for i, prompt in enumerate(self.prompts):
            label = " ".join((labels[i] if labels else prompt).split())
            self.select.addItem(label if len(label) <= MAX_PROMPT_LABEL else label[: MAX_PROMPT_LABEL - 1] + "…")
            self.select.setItemData(i, prompt, Qt.ItemDataRole.ToolTipRole)
        self.select.blockSignals(False)
        self.select.setVisible(bool(self.prompts))
        if self.prompts:
            self.select.setCurrentIndex(0)
            self._picked(0)

    def _picked(self, index: int) -> None:
        if 0 <= index < len(self.prompts):
            self.edit.setPlainText(self.prompts[index])

    def follow_tokenizer(self, has_chat_template: bool) -> None:
        """A new base: the toggle's default follows its tokenizer (off, and disabled, when it has no template)."""
        self.chat_check.setChecked(has_chat_template)
        self.chat_check.setText("chat template" if has_chat_template else "chat template (none: raw text)")
        self.chat_check.setEnabled(has_chat_template)


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
