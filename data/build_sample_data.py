"""Build the shipped prompt sets (deterministic; run from the repository root).

    python data/build_sample_data.py                  # train_prompts.parquet + eval_prompts.parquet
    python data/build_sample_data.py --hand-composed  # also the three hand-composed datasets (no model needed)

The training prompts are composed for this project from the hand-written phrase tables below (32 topics x 5
tasks). The shipped datasets are built from them by `python flows/pairs.py` (see data/README.md); the
`--hand-composed` variant instead gives each prompt a pool of four hand-written candidates with hand-assigned
quality and originality scores and picks pairs from those pools by the three criteria.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parent

# topic -> (a concrete image, an unexpected angle, a sensory detail)
TOPICS = {
    "the ocean": ("a tide that folds the shore like laundry", "the salt remembers every river it swallowed",
                  "cold spray on chapped lips"),
    "a city at night": ("taxi lights smeared across wet asphalt", "the buildings finally exhale after the crowds",
                        "the hum of a vending machine in an empty station"),
    "autumn leaves": ("maples setting small fires along the curb", "each leaf is a letter the tree stops answering",
                      "the crunch underfoot like stale toast"),
    "a lost key": ("a brass key asleep under the couch cushions", "the lock keeps waiting, loyal as a dog",
                   "the jingle you suddenly miss at the door"),
    "coffee": ("steam curling off a chipped blue mug", "the bean travelled further than you will this year",
               "bitterness that sharpens the morning"),
    "a lighthouse": ("a white tower counting the dark in slow turns", "the keeper talks to ships that never answer",
                     "rust and kerosene in the stairwell"),
    "the first snow": ("rooftops wearing fresh flour", "the street forgets its own footprints overnight",
                       "a hush that makes you whisper"),
    "an old library": ("ladders leaning on shelves like tired giants", "the books gossip in the dust after closing",
                       "the vanilla smell of aging paper"),
    "a thunderstorm": ("the sky cracking like a dropped plate", "the clouds argue and the trees take sides",
                       "ozone sharp in the back of the throat"),
    "a train journey": ("fields unspooling past the window", "strangers share a timetable and nothing else",
                        "the rhythm of wheels over rail joints"),
    "a garden": ("tomatoes blushing on their stakes", "the weeds are just plants with better lawyers",
                 "warm soil under fingernails"),
    "the moon": ("a thumbprint of light on the lake", "it has watched every war and still shows up",
                 "silver cold on a bedroom floor"),
    "a market": ("crates of oranges stacked like small suns", "every stall is a different argument about price",
                 "the shout of a fishmonger over the crowd"),
    "a bicycle": ("a chain ticking down a long hill", "it turns your own legs into a small engine",
                  "wind pulling tears from the corners of your eyes"),
    "a mountain": ("a ridge wearing a scarf of cloud", "it is patient in a way no person can be",
                   "thin air that makes every step a decision"),
    "a violin": ("a bow drawing honey out of four strings", "the wood still remembers being a tree in the wind",
                 "the rosin dust drifting in stage light"),
    # 16 more topics (issue 15): 160 prompts, so that after pair hygiene (truncated candidates excluded) a 20%
    # held-out split has enough pairs: 20 of the 160 prompts keep no pair, so 140 pairs, 28 held out, 112 trained.
    "a clock tower": ("iron hands pointing over the square", "it has never once been on time for itself",
                      "the bronze shudder of the hour bell"),
    "a kite": ("a red diamond tugging at the clouds", "it only flies because someone refuses to let go",
               "string burning across your palm"),
    "a forest path": ("roots braided across the trail", "every walker leaves and the path stays behind",
                      "pine needles soft and sharp underfoot"),
    "a bakery": ("loaves cooling in the window like sleeping cats", "the ovens start work before the town wakes",
                 "warm yeast in the cold morning air"),
    "a candle": ("a small flame bowing to every draft", "it spends itself to make a room smaller and kinder",
                 "the waxy smell after it is blown out"),
    "an umbrella": ("a black canopy blooming at the first drop", "it is a roof you can carry and forget",
                    "rain drumming an inch above your head"),
    "a river": ("a brown ribbon pulling the sky downstream", "it is never the same water, yet always the same name",
                "mud cool between the toes"),
    "fireflies": ("green sparks drifting over the meadow", "they speak in a language made only of pauses",
                  "the damp grass of a summer dusk"),
    "a chess game": ("a knight frozen halfway across the board", "the pieces wait while two people argue in silence",
                     "the click of wood on wood"),
    "a fox": ("a rust-coloured flicker at the edge of the field", "it lives in the gaps we leave between our houses",
              "a sharp musky scent by the fence"),
    "an attic": ("boxes stacked under a slanted beam", "it keeps everything the house is too shy to show",
                 "dust turning gold in a single window"),
    "a beehive": ("a humming box of hexagons in the orchard", "ten thousand workers and not one of them in charge",
                  "the sticky sweetness on the wooden frame"),
    "a ferris wheel": ("a ring of lights turning over the fairground", "it goes nowhere and everyone queues to ride it",
                       "the creak of the car at the very top"),
    "a telescope": ("a brass tube aimed at a patch of dark", "it lets you see light older than your grandparents",
                    "the cold eyepiece against your brow"),
    "a glacier": ("a blue wall of ice groaning into the sea", "it is a river too patient to hurry",
                  "the sharp cold breath off the ice"),
    "a sailboat": ("a white triangle leaning into the wind", "it moves forward by borrowing what pushes against it",
                   "rope wet and rough in your hands"),
}

# task -> (prompt template, creativity score)
TASKS = {
    "poem": ("Write a short poem about {topic}.", 0.9),
    "opening": ("Write the opening line of a story set around {topic}.", 0.8),
    "names": ("Suggest a name for a café themed around {topic}, and say why.", 0.6),
    "describe": ("Describe {topic} in two sentences.", 0.4),
    "slogan": ("Write a one-sentence slogan for a festival celebrating {topic}.", 0.7),
}


def candidates(task: str, topic: str) -> list[dict]:
    """Four responses: vivid-unusual, solid-conventional, cliché, poor. Scores are hand-assigned (0-1)."""
    image, angle, sense = TOPICS[topic]
    title = topic.replace("the ", "").replace("a ", "").replace("an ", "").strip().title()
    if task == "poem":
        texts = [
            f"{image.capitalize()},\n{angle},\n{sense} -\nand I stay until the light changes.",
            f"I think of {topic} and how it makes me feel,\n{image},\na quiet moment that is almost real.",
            f"Oh {topic}, so beautiful and grand,\nthe most wonderful thing in all the land.",
            f"{topic} is nice. The end.",
        ]
    elif task == "opening":
        texts = [
            f"Nobody believed Mara when she said {angle}, until the night of {image}.",
            f"It began, as these things do, with {image} and a stranger who would not give her name.",
            f"It was a dark and stormy night near {topic}.",
            f"This is a story about {topic}.",
        ]
    elif task == "names":
        texts = [
            f"\"The Patient {title}\" - because {angle}, and a café should feel just as unhurried.",
            f"\"{title} House\" - it is simple, easy to remember, and tells guests the theme at once.",
            f"\"Café {title}\" - because it is a café about {topic}.",
            "\"Cafe\" - it's a cafe.",
        ]
    elif task == "slogan":
        texts = [
            f"Come for {image}, stay because {angle}.",
            f"Celebrate {topic}: {sense}, music and good company all weekend.",
            f"The best festival about {topic} ever, don't miss it!",
            f"Festival. {topic}. Come.",
        ]
    else:
        texts = [
            f"Picture {image}: {sense}. Stay long enough and you notice that {angle}.",
            f"{topic.capitalize()} is easy to recognise: {image}. Most people remember {sense}.",
            f"{topic.capitalize()} is very beautiful and interesting. Many people like it a lot.",
            f"I am not sure what {topic} is.",
        ]
    quality = [0.9, 0.8, 0.45, 0.1]
    originality = [0.95, 0.55, 0.15, 0.05]
    # Embedding-style diversity: distance of a candidate from the pool's "average" phrasing; the cliché
    # and the poor answer share the pool's generic vocabulary, the vivid one does not.
    diversity = [0.62, 0.41, 0.22, 0.30]
    return [{"text": t, "quality": q, "originality": o, "diversity": d}
            for t, q, o, d in zip(texts, quality, originality, diversity)]


def build() -> dict[str, pd.DataFrame]:
    rows: dict[str, list[dict]] = {"1": [], "2": [], "3": []}
    for task, (template, creativity) in TASKS.items():
        for topic in TOPICS:
            prompt = template.format(topic=topic)
            prompt_id = "train-" + hashlib.sha1(prompt.encode()).hexdigest()[:8]
            pool = candidates(task, topic)
            vivid, solid, cliche, poor = pool
            picks = {
                # 1: among the better half by quality, the most diverse; among the worse half, the least diverse.
                "1": (vivid, cliche, "embedding_diversity", "diversity"),
                # 2: plain quality: best vs worst.
                "2": (vivid if vivid["quality"] >= solid["quality"] else solid, poor, "quality", "quality"),
                # 3: a judge's originality ranking among acceptable answers vs the least original acceptable one.
                "3": (vivid, solid if task in ("poem", "opening") else cliche, "llm_judge_diversity", "originality"),
            }
            # Dataset 2 prefers the conventional answer where the prompt asks for plain description.
            if task == "describe":
                picks["2"] = (solid, poor, "quality", "quality")
            for key, (chosen, rejected, criterion, score) in picks.items():
                rows[key].append({
                    "prompt_id": prompt_id, "prompt": prompt, "chosen": chosen["text"],
                    "rejected": rejected["text"], "creativity_score": creativity, "criterion": criterion,
                    "chosen_quality": chosen["quality"], "rejected_quality": rejected["quality"],
                    f"chosen_{score}": chosen[score], f"rejected_{score}": rejected[score],
                    "source": "hand-composed sample (data/build_sample_data.py)",
                })
    return {key: pd.DataFrame(value) for key, value in rows.items()}


EVAL_PROMPTS = [
    # (prompt, creativity)  factual -> open-ended
    ("What is the capital of Japan?", 0.0), ("How many days are in a leap year?", 0.0),
    ("What is 12 multiplied by 8?", 0.0), ("Which planet is closest to the sun?", 0.0),
    ("What gas do plants absorb from the air?", 0.05), ("Who wrote the play Romeo and Juliet?", 0.05),
    ("Convert 5 kilometres to metres.", 0.05), ("What is the boiling point of water at sea level in Celsius?", 0.0),
    ("Define the word 'photosynthesis' in one sentence.", 0.15), ("Explain what a prime number is.", 0.15),
    ("Summarise why the sky looks blue.", 0.2), ("List three uses of a paperclip.", 0.3),
    ("Give two tips for sleeping better.", 0.25), ("Explain how a bicycle gear works to a child.", 0.35),
    ("What are the pros and cons of working from home?", 0.3), ("Suggest a healthy breakfast.", 0.35),
    ("Write a polite email declining a meeting invitation.", 0.4), ("Describe your ideal weekend.", 0.5),
    ("Give advice to someone learning to cook.", 0.4), ("Recommend a hobby for a rainy day and explain why.", 0.5),
    ("Write a thank-you note to a neighbour.", 0.5), ("Describe a sunrise over a desert.", 0.6),
    ("Invent a name for a new board game and describe it.", 0.7), ("Write a limerick about a forgetful robot.", 0.8),
    ("Describe a colour to someone who has never seen it.", 0.75), ("Write a haiku about a paper boat.", 0.8),
    ("Invent a holiday and explain how people celebrate it.", 0.85), ("Write a short myth about why owls stay awake.", 0.9),
    ("Imagine a city built inside a whale. Describe one street.", 0.95), ("Write a love letter from a teapot to a cup.", 0.95),
    ("Describe a creature that lives in clouds.", 0.9), ("Write a dialogue between the sun and the moon.", 0.9),
    ("Invent a new musical instrument and describe its sound.", 0.9), ("Write a bedtime story about a shy volcano.", 0.95),
    ("Describe a dream you might have on a spaceship.", 0.9), ("Write a recipe for happiness.", 0.85),
    ("Tell a joke about a cat who became a detective.", 0.85), ("Write a postcard from the bottom of the sea.", 0.95),
    ("Describe the smell of a library on Mars.", 1.0), ("Write a poem from the point of view of a streetlamp.", 1.0),
    ("Invent a sport played in zero gravity.", 0.95), ("Write the first line of a fairy tale set in a supermarket.", 0.9),
    ("What would a conversation between two trees sound like?", 0.95), ("Describe a festival of lanterns on a frozen lake.", 0.85),
    ("Explain what the moon would say if it could complain.", 1.0), ("Name three flavours of ice cream a dragon would like.", 0.9),
    ("Write a short speech for a snail running for mayor.", 1.0), ("Describe the last bookshop on Earth.", 0.9),
]


def main() -> None:
    import sys

    datasets = build()
    names = {"1": "dataset1_embedding_diversity.parquet", "2": "dataset2_quality_based.parquet",
             "3": "dataset3_llm_judge_diversity.parquet"}
    if "--hand-composed" in sys.argv[1:]:
        for key, frame in datasets.items():
            frame.to_parquet(OUT / names[key], index=False)
            print(f"wrote {names[key]}: {len(frame)} pairs")
    evals = pd.DataFrame([
        {"prompt_id": f"eval-{i:03d}", "prompt": p, "creativity_score": c} for i, (p, c) in enumerate(EVAL_PROMPTS)
    ])
    prompts = datasets["1"][["prompt_id", "prompt", "creativity_score"]]
    prompts.to_parquet(OUT / "train_prompts.parquet", index=False)
    print(f"wrote train_prompts.parquet: {len(prompts)} prompts (input of `python flows/pairs.py`)")
    train_prompts = set(datasets["1"]["prompt"])
    assert not train_prompts & set(evals["prompt"]), "eval prompts must not overlap training prompts"
    evals.to_parquet(OUT / "eval_prompts.parquet", index=False)
    print(f"wrote eval_prompts.parquet: {len(evals)} prompts")


if __name__ == "__main__":
    main()
