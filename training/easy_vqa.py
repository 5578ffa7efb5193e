"""easy-VQA (the `easy-vqa` PyPI package): 4,000 / 1,000 64x64 images, 38,575 / 9,673 questions, 13 answers."""

from __future__ import annotations

from pathlib import Path

from training.examples import TaskData, VQAExample


def load_easy_vqa() -> TaskData:
    """The real easy-VQA splits as shipped in the package (one answer per question, score 1)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise RuntimeError("easy-VQA needs the `easy-vqa` package: pip install easy-vqa") from e

    def split(questions, image_paths) -> list[VQAExample]:
        texts, answers, image_ids = questions
        return [
            VQAExample(image=Path(image_paths[i]), question=q, answers={a: 1.0})
            for q, a, i in zip(texts, answers, image_ids, strict=True)
        ]

    return TaskData(
        task="vqa",
        labels=sorted(easy_vqa.get_answers()),
        train=split(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        test=split(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
        name="easy-vqa",
    )
