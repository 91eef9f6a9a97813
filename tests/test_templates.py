import pytest

from trprompt.templates import TEMPLATES_VERSION, Templates, load_templates


def test_messages_carry_every_field():
    t = Templates()
    m = t.prompt_model_messages("What is 2+2?", "REWARD-TEXT")
    assert m[0]["role"] == "system" and m[-1]["role"] == "user"
    assert "What is 2+2?" in m[-1]["content"] and "REWARD-TEXT" in m[-1]["content"]
    r = t.reward_model_messages("Q?", "INSTR", "ANS", "GOLD")
    body = r[-1]["content"]
    for s in ("Q?", "INSTR", "ANS", "GOLD"):
        assert s in body
    assert t.target_messages("Q?", "Be careful.")[0]["content"] == "Q?\n\nBe careful."
    assert t.target_messages("Q?", "  ")[0]["content"] == "Q?"
    assert t.numeric_reward(True) != t.numeric_reward(False)
    assert TEMPLATES_VERSION


def test_override_from_yaml(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("cot_instruction: Think carefully.\nprompt_model_user: 'Q={question} R={reward}'\n")
    t = load_templates(p)
    assert t.cot_instruction == "Think carefully."
    assert t.prompt_model_messages("a", "b")[-1]["content"] == "Q=a R=b"
    assert t.reward_model_system == Templates().reward_model_system


@pytest.mark.parametrize(
    "text, match",
    [
        ("nonexistent: x\n", "unknown template"),
        ("prompt_model_user: 'only {question}'\n", "placeholders"),
        ("cot_instruction: 3\n", "must be a string"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_overrides(tmp_path, text, match):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_templates(p)


def test_prompt_model_prompts_under_one_reward_share_a_prefix():
    """The reward precedes the question, so every Π prompt under one t* starts with the same text."""
    from trprompt.templates import Templates

    t = Templates()
    a = t.prompt_model_messages("What is 2 + 2?", "REWARD TEXT")
    b = t.prompt_model_messages("How many apples are left?", "REWARD TEXT")
    assert a[0] == b[0]
    head = a[1]["content"].split("What is 2 + 2?")[0]
    assert "REWARD TEXT" in head and b[1]["content"].startswith(head)


# ------------------------------------------------------------------------------------ task wording
V2_TEXTS_SHA = "3ec7bacdddff875eafacece0829ff472fbe38a6f330bb4eba726d66f25c56f0f"
V2_MESSAGES_SHA = "b35f7bf1f53a2fd5bd078b000e6025f35e7b710f3e6063ed8fd9c88fcfa8f1c5"
V2_FIELDS = ("cot_instruction", "initial_optimal_reward", "numeric_reward_correct", "numeric_reward_incorrect",
             "optimal_reward_role", "prompt_model_system", "prompt_model_user", "reward_model_system",
             "reward_model_user", "reward_search_loss", "target_user", "target_user_no_instruction",
             "task_instruction_role")


def _sha(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("dataset", ["gsm8k", "gsm_hard", "math", "svamp"])
def test_builtin_math_tasks_render_byte_identical_templates(dataset):
    """The hashes were taken from templates v2 (before task wording existed): same texts, same messages."""
    import dataclasses

    from trprompt.data import load_task

    t = load_templates(None, load_task(dataset))
    assert _sha({k: v for k, v in dataclasses.asdict(t).items() if k in V2_FIELDS}) == V2_TEXTS_SHA
    msgs = {"pm": t.prompt_model_messages("Q1 {x}?", "R1"), "rm": t.reward_model_messages("Q1?", "I1", "A1", "G1"),
            "tg": t.target_messages("Q1?", "I1")}
    assert _sha(msgs) == V2_MESSAGES_SHA
    # the worked solution is not shown to R under the math wording (as before)
    assert t.reward_model_messages("Q1?", "I1", "A1", "G1", "SOLUTION") == msgs["rm"]
    assert t == Templates()


def test_neutral_wording_carries_the_task_description(tmp_path):
    import json

    from trprompt.data import load_task
    from trprompt.templates import NEUTRAL_WORDING

    f = tmp_path / "units.jsonl"
    f.write_text("".join(json.dumps({"question": f"{i} m in cm?", "answer": str(100 * i)}) + "\n"
                         for i in range(1, 11)))
    desc = "Convert a quantity between units; a correct answer is one number in the target unit {e.g. 300}."
    task = load_task(str(f), description=desc)
    t = load_templates(None, task)
    for name in NEUTRAL_WORDING:
        text = getattr(t, name)
        assert "math" not in text.lower() and "{task_description}" not in text, name
    for name in ("prompt_model_system", "reward_model_system", "initial_optimal_reward", "optimal_reward_role",
                 "task_instruction_role", "opro_meta_header", "textgrad_task_loss"):
        assert "Convert a quantity between units" in getattr(t, name), name
    # braces in the description survive the later .format() of the loss
    assert "{e.g. 300}" in t.textgrad_task_loss.format(correct=1, n=2, failures="F")
    rm = t.reward_model_messages("Q?", "I", "A", "G", "100 cm per metre")[-1]["content"]
    assert "Reference explanation:\n100 cm per metre" in rm
    assert "Reference" not in t.reward_model_messages("Q?", "I", "A", "G")[-1]["content"]
    other = load_templates(None, load_task(str(f), description="Something else entirely."))
    assert other.fingerprint() != t.fingerprint() and t.record()["fingerprint"] == t.fingerprint()
    # a templates file may use {task_description}; a built-in with a description of its own goes neutral
    p = tmp_path / "t.yaml"
    p.write_text("reward_model_system: 'Judge. Task: {task_description}'\n")
    assert load_templates(p, task).reward_model_system == f"Judge. Task: {desc}"
    assert "Add two numbers." in load_templates(None, load_task("svamp", description="Add two numbers."))\
        .prompt_model_system
