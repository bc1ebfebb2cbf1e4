"""The two models of a distillation: the frozen teacher (the stock checkpoint, reproduced exactly) and the student
(the same weights with the position embedding replaced by the ALiBi bias, or removed)."""

from __future__ import annotations

from alibi_dinov2.conversion.convert import convert
from alibi_dinov2.errors import InputError
from alibi_dinov2.features.extraction import patch_size_of
from alibi_dinov2.training.arguments import RunArguments


def load_teacher(source):
    """The teacher, reproducing `source` exactly (its own position scheme), frozen and in eval mode."""

    teacher = convert(source, variant="keep-pe")
    teacher.requires_grad_(False)
    return teacher.eval()



def build_student(teacher_source, variant: str, init_from=None):
    """The student: the teacher's (or `init_from`'s) weights as `variant` ("alibi" or "nope"), of the architecture
    of that checkpoint (an ALiBi-DINOv2 from a DINOv2, an ALiBi-DINOv3 from a DINOv3). Every weight trains except
    the mask token, which only masked pre-training uses (it would get no gradient here)."""

    student = convert(init_from or teacher_source, variant=variant)
    student.requires_grad_(True)
    student.embeddings.mask_token.requires_grad_(False)
    return student.train()



def check_models(teacher, student, args: RunArguments) -> int:
    """Check that teacher and student fit together and with `--image_size` (`args`: train_distill.py's options);
    returns the patch size."""
    patch_size, student_patch = patch_size_of(teacher), patch_size_of(student)
    width, student_width = teacher.config.hidden_size, student.config.hidden_size
    if (student_patch, student_width) != (patch_size, width):
        raise InputError(
            f"The student ({args.init_from}) does not match the teacher ({args.teacher}): patch size "
            f"{student_patch} vs {patch_size}, width {student_width} vs {width}."
        )
    for name in ("image_size", "probe_image_size"):
        size = getattr(args, name)
        if size < patch_size:
            raise InputError(
                f"--{name} {size} is smaller than one {patch_size} x {patch_size} patch of the teacher; use at least "
                f"{patch_size} (e.g. {16 * patch_size})."
            )
    if args.random_roll and args.image_size % patch_size:
        raise InputError(
            f"--random_roll rolls by whole patches and needs --image_size to be a multiple of {patch_size}; got "
            f"{args.image_size} (use {args.image_size // patch_size * patch_size} or "
            f"{(args.image_size // patch_size + 1) * patch_size})."
        )
    if isinstance(args.blank_channels, list) and any(c >= width for c in args.blank_channels):
        raise InputError(
            f"--blank_channels {args.blank_channels} lists channels beyond the teacher's {width} "
            f"(valid: 0 to {width - 1})."
        )
    return patch_size

