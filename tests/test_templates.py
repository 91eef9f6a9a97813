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
