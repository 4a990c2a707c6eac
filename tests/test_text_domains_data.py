"""The built-in text-domain benchmark: sizes, and held-out sentences that never repeat a training one."""

from hf_dtgma.data import TEXT_DOMAIN_TASKS, load_text_domains
from hf_dtgma.data.text_domains import normalize_text


def test_eight_binary_domains_with_enough_distinct_sentences():
    tasks = load_text_domains()
    assert [task.name for task in tasks] == list(TEXT_DOMAIN_TASKS) and len(tasks) == 8
    for task in tasks:
        assert len(task.labels) == 2
        for split, minimum in (("train", 60), ("validation", 10), ("test", 25)):
            data = getattr(task, split)
            for label in (0, 1):
                texts = [t for t, l in zip(data["text"], data["label"]) if l == label]  # noqa: E741
                assert len(texts) >= minimum, (task.name, split, label)
                assert len({normalize_text(t) for t in texts}) == len(texts), (task.name, split, label)


def test_no_held_out_sentence_is_a_case_or_whitespace_variant_of_a_training_one():
    for task in load_text_domains():
        train = {normalize_text(text) for text in task.train["text"]}
        validation = {normalize_text(text) for text in task.validation["text"]}
        test = {normalize_text(text) for text in task.test["text"]}
        assert not train & test, task.name
        assert not train & validation and not validation & test, task.name


def test_normalisation_catches_case_and_whitespace_variants():
    assert normalize_text("The  Market\tRallied ") == normalize_text("the market rallied")


def test_splits_do_not_depend_on_anything_but_the_files():
    first, second = load_text_domains(2), load_text_domains(2)
    assert [t.test["text"] for t in first] == [t.test["text"] for t in second]
