"""Command lines that messages tell users to run, written once."""

EXTRACT_COMMAND = "python -m flows.extract_clip --root DATASET --store {store}"
"""Stage 1 over a store's scenes; `{store}` is the store's path or URL."""

REPAIR_COMMAND = EXTRACT_COMMAND + " --dataset KIND --model MODEL --pretrained WEIGHTS --verify"
"""Stage 1 again with the damaged feature set's own encoder (another model or weights would make
a new feature set and leave the damaged one as it is), reading every chunk back and redoing the
frames whose chunks are missing or corrupt."""


def repair_command(store: str) -> str:
    """REPAIR_COMMAND for `store`, quoted, with where its placeholders come from."""
    return (f"`{REPAIR_COMMAND.format(store=store)}` (KIND, MODEL, WEIGHTS: those the store was "
            f"written with, which `python -m storage.inspect {store}` lists)")
