"""loram run RECIPE.yaml [KEY=VALUE ...] [--dry-run]"""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("run", help="run a recipe: prune -> align -> train -> recover -> merge -> eval (skips up-to-date stages)")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override recipe knobs by dotted name, read as YAML (train.lr=2e-4 prune.ratio=0.65 base=other)")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe and print the stages without running them")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..progress import Measure, quiet
    from ..recipe import run_recipe
    from ..training import TrainingInterrupted
    from .train import interrupted

    m = Measure()
    # the stage list and "stage k/n running" are status lines (--quiet drops them); with --dry-run they are the result
    echo = print if a.dry_run or not quiet() else (lambda *_: None)
    try:
        steps = run_recipe(a.recipe, dry_run=a.dry_run, overrides=a.overrides, echo=echo)
    except TrainingInterrupted as e:
        return interrupted(e)
    if a.dry_run:
        print(f"dry run: recipe is valid, {sum(s.status != 'skip' for s in steps)} of {len(steps)} stages would run")
    else:
        print(m.line(f"recipe done: {len(steps)} stages, outputs in {steps[-1].out.parent if steps else '-'}"))
    return 0
