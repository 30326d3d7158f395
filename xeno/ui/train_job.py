"""The Training tab's job: train the user's personal intent model in a child process.

The app runs it from a worker thread and reads one JSON object per line
(progress, log lines, then the result or an error); cancelling kills the
process. The new personal version is stored in one transaction at the very
end (`CustomModelTrainer`), so a cancelled run leaves the store as it was.

    python -m xeno.ui.train_job --user U --home DIR [--db URL --model NAME | --device-body]
        [--optimizer adam|sgd --learning-rate LR --epochs N --batch-size B]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def federated_body(db: str, model: str) -> Any:
    """The body of a federated intent model: its global embedding and featurization."""
    from client.assistant.bodies import FastTextBody
    from common.models import FastText, build_model
    from server.lifecycle.versions import VersionControl
    from xeno._store import open_store
    from xeno.model_versioning import ModelVersionControl

    store = open_store(db)
    try:
        versions = ModelVersionControl(store=store)
        head = versions.get_version(model)
        spec = VersionControl(store).spec(model)
        if spec.architecture != "fasttext":
            raise ValueError(
                f"model {model!r} is a {spec.architecture} model, not an intent (fasttext) model"
            )
        net = build_model(spec)
        assert isinstance(net, FastText)
        state = versions.load_state_dict(model)
        embedding = state["embedding.weight"].numpy()
        return FastTextBody(embedding, net.features, f"{model}-v{head['version']}")
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xeno.ui.train_job")
    p.add_argument("--user", required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--db", default="")
    p.add_argument("--model", default="")
    p.add_argument("--device-body", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("lbfgs", "adam", "sgd"), default="lbfgs")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    try:
        from client.assistant.store import UserStore
        from xeno.model_finetuning import CustomModelTrainer, MiniBatch

        optimization = None
        if args.optimizer != "lbfgs":
            optimization = MiniBatch(
                args.learning_rate, args.epochs, args.batch_size, args.optimizer
            )

        emit(progress=5, log=f"opening the store of {args.user}")
        body = None
        if args.model and args.db:
            emit(progress=10, log=f"loading the body of the federated model {args.model}")
            body = federated_body(args.db, args.model)
        elif args.device_body:
            from client.assistant.bodies import fasttext_body

            emit(progress=10, log="loading the federated intent body saved on this device")
            body = fasttext_body(Path(args.home))
            if body is None:
                raise ValueError("this device has no federated intent body yet")
        with UserStore(args.user, home=args.home) as store:
            trainer = CustomModelTrainer(args.user, store=store, body=body)
            examples = trainer.labelled_examples()
            intents = len({i for _, i in examples})
            emit(
                progress=25,
                log=f"{len(examples)} labelled examples of {intents} intents; body "
                f"{trainer.body.name}",
            )
            how = "L-BFGS" if optimization is None else optimization.describe()
            emit(
                progress=30,
                busy=True,
                log=f"fitting ({how}), calibrating on 20% held out, refitting",
            )
            result = trainer.train_intent_classifier(seed=args.seed, optimization=optimization)
        if not result.get("success"):
            emit(error=result.get("error", "training failed"), result=result)
            return 1
        emit(progress=100, log=f"stored personal version {result['version']}", result=result)
        return 0
    except Exception as exc:  # reported to the window, which says what to do
        emit(error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
