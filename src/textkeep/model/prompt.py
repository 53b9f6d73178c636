"""Prompts in the LLM's own chat template, with a `<speech>` placeholder for the adaptor's outputs.

The text path and the speech path use the same template: the speech path leaves a gap where `<speech>` stands
(filled by the adaptor in `SpeechLLM`), the text path writes the transcript there. Labels cover only the
assistant's response and the end-of-turn token that closes it, so the loss teaches answering, not prompting.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEECH_PLACEHOLDER = "<speech>"
IGNORE_INDEX = -100

# LLaMA-Omni's defaults (its Stage-1 conversation template).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
DEFAULT_USER_TEMPLATE = "<speech>\nPlease directly answer the questions in the user's speech."


@dataclass
class Encoded:
    """One example as token pieces: `before` + [speech slots] + `after` + `response`.

    For the text path `after` is empty and `before` holds the whole prompt.
    """

    before: list[int]
    after: list[int]
    response: list[int]  # the response's tokens followed by the end-of-turn token; empty at generation time
    is_speech: bool


class PromptFormatter:
    def __init__(
        self, tokenizer, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, user_template: str = DEFAULT_USER_TEMPLATE
    ):
        if user_template.count(SPEECH_PLACEHOLDER) != 1:
            raise ValueError(f"user_template must contain '{SPEECH_PLACEHOLDER}' exactly once, got {user_template!r}")
        if tokenizer.chat_template is None:
            raise ValueError(
                "the tokenizer has no chat template; use an instruction-tuned LLM or set tokenizer.chat_template"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.user_template = user_template
        self.end_of_turn_id = self._find_end_of_turn()

    def _messages(self, user: str, assistant: str | None = None) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
        return messages

    def _render(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(self._messages(user), tokenize=False, add_generation_prompt=True)

    def _find_end_of_turn(self) -> int:
        # The template's own text after an assistant message tells which token closes a turn
        # (<|im_end|> for ChatML, <|eot_id|> for Llama 3), so no model family is hard-coded.
        marker = "XQXQ"
        prompt = self._render("hi")
        full = self.tokenizer.apply_chat_template(self._messages("hi", marker), tokenize=False)
        if not full.startswith(prompt) or marker not in full[len(prompt) :]:
            raise ValueError("cannot locate the assistant turn in the chat template's output")
        tail = full[len(prompt) :].split(marker, 1)[1]
        ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        if ids:
            return ids[0]
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the chat template ends turns with nothing and the tokenizer has no EOS token")
        return self.tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, text: str | None, response: str | None = None) -> Encoded:
        """`text` is the transcript (text path) or None (speech path: the adaptor fills the placeholder)."""
        if text is None:
            before, after = self._render(self.user_template).split(SPEECH_PLACEHOLDER)
            before_ids, after_ids = self._ids(before), self._ids(after)
        else:
            before_ids, after_ids = self._ids(self._render(self.user_template.replace(SPEECH_PLACEHOLDER, text))), []
        response_ids = self._ids(response) + [self.end_of_turn_id] if response is not None else []
        return Encoded(before_ids, after_ids, response_ids, is_speech=text is None)
