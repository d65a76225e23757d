"""Training prompts for the SmolLM2 adapter: a fixed grid of instruction templates x topics (written for this
repository, CC0), plus questions the model writes itself (the self-instruct stage of
``scripts/train_smollm2_adapter.py``). None comes from Spec-Bench or MT-bench; the measured prompts are those.
"""
from __future__ import annotations

import random
from typing import Dict, List

TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "volcanoes", "the French Revolution", "the Roman Empire",
    "machine learning", "climate change", "the human heart", "vaccines", "electric cars", "the stock market",
    "inflation", "renewable energy", "the printing press", "ancient Egypt", "honeybees", "coral reefs",
    "the moon landing", "earthquakes", "bread baking", "coffee", "chess", "jazz music", "the Olympic Games",
    "social media", "sleep", "meditation", "recycling", "the internet", "smartphones", "rainforests",
    "the immune system", "gravity", "magnets", "the solar system", "dinosaurs", "the Renaissance",
    "democracy", "compound interest", "public libraries", "bicycles", "gardening", "volunteering",
    "time management", "learning a language", "remote work", "city parks", "DNA", "the periodic table",
]

ACTIVITIES = [
    "studying for an exam", "starting a small business", "learning to cook", "running a first marathon",
    "saving money", "moving to a new city", "writing a resume", "preparing for a job interview",
    "keeping a houseplant alive", "planning a road trip", "learning to code", "making new friends",
    "reducing screen time", "organising a closet", "training a puppy", "giving a presentation",
]

TEMPLATES: Dict[str, List[str]] = {
    "explain": [
        "Explain {topic} in simple terms.",
        "What is {topic}? Give a short answer.",
        "Why is {topic} important?",
        "Explain {topic} to a ten-year-old.",
        "What are three interesting facts about {topic}?",
        "Describe the history of {topic} in a paragraph.",
    ],
    "writing": [
        "Write a short poem about {topic}.",
        "Write a short story that involves {topic}.",
        "Write a blog post introduction about {topic}.",
        "Write a haiku about {topic}.",
        "Write a persuasive paragraph about why people should learn about {topic}.",
    ],
    "advice": [
        "Give me five tips for {activity}.",
        "What are common mistakes people make when {activity}?",
        "How should I get started with {activity}?",
        "Make a simple weekly plan for {activity}.",
    ],
    "compare": [
        "Compare {topic} and {other}. How are they similar and different?",
        "Which is more interesting to study, {topic} or {other}? Explain your answer.",
    ],
    "roleplay": [
        "Pretend you are a tour guide. Introduce {topic} to a group of visitors.",
        "Act as a teacher and ask me three quiz questions about {topic}.",
        "You are a friendly librarian. Recommend how I could learn more about {topic}.",
    ],
    "math": [
        "What is {a} plus {b}? Show your work.",
        "If a shirt costs {a} dollars and is discounted by {pct} percent, what is the new price?",
        "A train travels {a} kilometres in {h} hours. What is its average speed?",
        "What is {a} multiplied by {h}?",
        "Solve for x: {h}x + {b} = {c}.",
    ],
    "coding": [
        "Write a Python function that returns the sum of a list of numbers.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Write a Python function that counts the vowels in a string.",
        "Write a Python function that returns the largest of three numbers.",
        "Explain what a for loop does in Python, with an example.",
        "Write a Python function that reverses a list without using reversed().",
        "What is the difference between a list and a tuple in Python?",
        "Write a Python function that computes the factorial of n.",
    ],
    "rewrite": [
        "Rewrite this sentence to sound more formal: \"{topic_cap} is really cool and everyone should check it out.\"",
        "Translate into French: \"I would like to learn more about {topic}.\"",
        "Translate into Spanish: \"{topic_cap} is an interesting subject.\"",
        "Summarize in one sentence why {topic} matters.",
    ],
}


def template_prompts(seed: int = 0) -> List[Dict[str, str]]:
    """Every template filled with seeded topics/activities/numbers: a list of {"category", "prompt"}."""
    rng = random.Random(seed)
    out = []
    for category, templates in TEMPLATES.items():
        for template in templates:
            uses_topic = "{topic" in template or "{other}" in template
            fills = TOPICS if uses_topic else (ACTIVITIES if "{activity}" in template else [None] * 12)
            for topic in fills:
                if template.count("{") == 0 and topic is None and out and out[-1]["prompt"] == template:
                    break  # a template with nothing to fill appears once
                other = rng.choice([t for t in TOPICS if t != topic])
                a, b = rng.randint(12, 480), rng.randint(3, 97)
                text = template.format(topic=topic, topic_cap=(topic or "").capitalize(), other=other,
                                       activity=topic, a=a, b=b, c=b + rng.randint(2, 9) * rng.randint(2, 9),
                                       h=rng.randint(2, 9), pct=rng.choice([10, 15, 20, 25, 30, 40, 50]))
                out.append({"category": category, "prompt": text})
    return out


SELF_INSTRUCT = "Write one question that a curious person might ask about {topic}. Write only the question."
