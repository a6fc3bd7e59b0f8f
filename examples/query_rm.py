"""Query a running reward-model service with plain `requests`.

Start one first (e.g. ``rlhf-ray serve-rm`` or
``serve run rlhf_ray.reward.serve:app_builder checkpoint=/path/to/rm``), then:

    python examples/query_rm.py --url http://127.0.0.1:8000

If the service was started with a token (env var RLHF_RAY_SERVE_TOKEN set), set the same variable here.
"""

import argparse
import os

import requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--token-env", default="RLHF_RAY_SERVE_TOKEN")
    args = ap.parse_args()
    token = os.environ.get(args.token_env)
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"

    print(session.get(f"{args.url}/healthz", timeout=10).json())
    print(session.get(f"{args.url}/version", timeout=10).json())

    # One prompt, K candidate responses: rewards, P(y_i | x) = softmax(rewards), the best index.
    r = session.post(f"{args.url}/score", timeout=30, json={
        "prompt": "Review the film:",
        "responses": ["A moving, beautifully acted story.", "bad", "I did not watch it."],
    })
    r.raise_for_status()
    answer = r.json()
    for i, (reward, p) in enumerate(zip(answer["rewards"], answer["probs"])):
        mark = "  <- best" if i == answer["best"] else ""
        print(f"  response {i}: reward {reward:+.3f}  P {p:.3f}{mark}")
    print(f"  truncated: {answer['truncated']}, model {answer['model_version']}")

    # Several prompts in one request.
    r = session.post(f"{args.url}/score_batch", timeout=30, json={"items": [
        {"prompt": "Review the film:", "responses": ["Great.", "Terrible."]},
        {"prompt": "Review the restaurant:", "responses": ["Tasty food, friendly staff."]},
    ]})
    r.raise_for_status()
    print([res["best"] for res in r.json()["results"]])

    # A bad request is a 4xx with a JSON error naming the field.
    r = session.post(f"{args.url}/score", json={"prompt": "x", "responses": []}, timeout=30)
    print(r.status_code, r.json()["error"]["message"])


if __name__ == "__main__":
    main()
