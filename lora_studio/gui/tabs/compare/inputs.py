"""The Compare tab's inputs: the prompt (typed, or picked from a loaded list) and the Prompts/Chat mode switch."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

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
        self.select.setMinimumContentsLength(12)  # a long prompt label elides: the tab fits a 1000-pixel window
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


class ModeSwitch(QWidget):
    """Prompts: one prompt (or a list) through every variant; Chat: a conversation, each variant its own history."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.prompts_btn = QPushButton("Prompts")
        self.chat_btn = QPushButton("Chat")
        self.chat_btn.setToolTip("a multi-turn conversation: every variant answers the same turns side by side")
        group = QButtonGroup(self)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.setSpacing(0)
        for button in (self.prompts_btn, self.chat_btn):
            button.setCheckable(True)
            group.addButton(button)
            row.addWidget(button)
        self.prompts_btn.setChecked(True)
