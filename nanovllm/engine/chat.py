"""Conversations -> prompt token ids, through the tokenizer's chat template (transformers'
`apply_chat_template`), validated before any request runs.

A conversation is a list of `{"role": str, "content": ...}` dicts; `LLM.chat` takes one
conversation or a list of them. Every error names the conversation: `conversations[i]`."""
from collections.abc import Mapping


Message = Mapping[str, object]
Conversation = list[Message]


def as_conversations(messages) -> list[Conversation]:
    """One conversation (a list of message dicts) or a list of them -> a list of conversations."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a conversation (a non-empty list of {{'role', 'content'}} dicts) "
                         f"or a list of them, got {_short(messages)}")
    if all(isinstance(m, Mapping) for m in messages):
        return [list(messages)]
    return list(messages)


def check_conversation(i: int, conversation) -> None:
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"conversations[{i}] must be a non-empty list of {{'role', 'content'}} dicts, "
                         f"got {_short(conversation)}")
    for j, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise ValueError(f"conversations[{i}][{j}] must be a {{'role', 'content'}} dict, got {_short(message)}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ValueError(f"conversations[{i}][{j}] has no {' or '.join(map(repr, missing))} key: {_short(message)}")
        if not isinstance(message["role"], str):
            raise ValueError(f"conversations[{i}][{j}]: role must be a string, got {_short(message['role'])}")


def chat_prompt_ids(tokenizer, messages, chat_template: str | None = None, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """The prompt token ids of each conversation, as `apply_chat_template(tokenize=True)` makes them."""
    conversations = as_conversations(messages)
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversations[0]: the tokenizer has no chat template; pass chat_template=... "
                         "(a Jinja template string)")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
        raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    prompts = []
    for i, conversation in enumerate(conversations):
        check_conversation(i, conversation)
        try:
            token_ids = tokenizer.apply_chat_template(
                list(conversation), chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tokenize=True, return_dict=False, **(chat_template_kwargs or {}))
        except Exception as e:  # a template is code: raise_exception, or any error its expressions hit
            raise ValueError(f"conversations[{i}]: the chat template rejected it: {e}") from e
        if not token_ids:
            raise ValueError(f"conversations[{i}]: the chat template produced an empty prompt")
        prompts.append(list(token_ids))
    return prompts


def _short(value) -> str:
    return f"{type(value).__name__}: {value!r:.80}"
