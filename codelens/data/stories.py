"""Synthetic children's-story corpus with ground-truth topics and regex features.

A stand-in for TinyStories: `generate_stories` builds short, simple stories about
one topic each from a template grammar (shared sentences plus topic-specific sentences
and a per-topic lexicon). A topic-neutral opening comes first; in about half the stories
a short sentence then names the topic before the topic's own intro. Regex-detectable
features (months, four-digit years, names starting with "B", digit numbers, number
words) are sprinkled in at the rates in `FEATURE_RATES`, and `PATTERNS` holds the
regexes that find them.
`TopicClassifier` judges which topic a (generated) text is about.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "B_NAMES",
    "FEATURE_RATES",
    "LEXICONS",
    "MONTHS",
    "NAMES",
    "NUMBER_WORDS",
    "OTHER_NAMES",
    "PATTERNS",
    "TOPICS",
    "Story",
    "TopicClassifier",
    "feature_rates",
    "generate_stories",
    "lexicon_hits",
    "read_corpus",
    "tokenize",
    "write_corpus",
]


@dataclass(frozen=True)
class Story:
    """One generated story and its ground-truth topic."""

    text: str
    topic: str


TOPICS: tuple[str, ...] = (
    "dragon",
    "flower",
    "fire",
    "princess",
    "football",
    "baby",
    "slide",
    "friend",
    "cake",
    "boat",
    "snow",
    "rocket",
    "bike",
    "zoo",
    "piano",
    "doctor",
)

MONTHS: tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

NUMBER_WORDS: tuple[str, ...] = (
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

# (name, "f" | "m")
_B_NAMES_G: tuple[tuple[str, str], ...] = (
    ("Ben", "m"), ("Bella", "f"), ("Bob", "m"), ("Bonnie", "f"), ("Billy", "m"),
    ("Betty", "f"), ("Benny", "m"), ("Bruno", "m"), ("Beth", "f"), ("Brooke", "f"),
    ("Bea", "f"), ("Blake", "m"), ("Barney", "m"), ("Bianca", "f"), ("Bridget", "f"),
    ("Bart", "m"), ("Brenda", "f"), ("Bert", "m"), ("Bess", "f"), ("Boris", "m"),
    ("Becky", "f"), ("Bruce", "m"), ("Basil", "m"), ("Brianna", "f"),
)  # fmt: skip
_OTHER_NAMES_G: tuple[tuple[str, str], ...] = (
    ("Lily", "f"), ("Tom", "m"), ("Sue", "f"), ("Max", "m"), ("Anna", "f"), ("Sam", "m"),
    ("Mia", "f"), ("Jack", "m"), ("Lucy", "f"), ("Tim", "m"), ("Emma", "f"), ("Leo", "m"),
    ("Zoe", "f"), ("Kate", "f"), ("Nina", "f"), ("Oscar", "m"), ("Finn", "m"), ("Ella", "f"),
    ("Jake", "m"), ("Molly", "f"), ("Sara", "f"), ("Ollie", "m"), ("Ruby", "f"), ("Amy", "f"),
    ("Pete", "m"), ("Hannah", "f"), ("Joe", "m"), ("Kim", "f"), ("Luke", "m"), ("Nora", "f"),
    ("Owen", "m"), ("Paul", "m"), ("Rita", "f"), ("Sid", "m"), ("Tina", "f"), ("Vera", "f"),
    ("Eli", "m"), ("Gus", "m"), ("Ivy", "f"), ("Dan", "m"), ("Ned", "m"), ("Fay", "f"),
    ("Hugo", "m"), ("Lena", "f"), ("Milo", "m"), ("Omar", "m"), ("Tara", "f"), ("Ted", "m"),
    ("Uma", "f"), ("Zack", "m"), ("Chloe", "f"), ("Adam", "m"), ("Grace", "f"), ("Noah", "m"),
)  # fmt: skip

B_NAMES: tuple[str, ...] = tuple(n for n, _ in _B_NAMES_G)
OTHER_NAMES: tuple[str, ...] = tuple(n for n, _ in _OTHER_NAMES_G)
NAMES: tuple[str, ...] = B_NAMES + OTHER_NAMES

FEATURE_RATES: dict[str, float] = {
    "month": 0.35,  # share of stories with a month name
    "year": 0.25,  # share of stories with a four-digit year
    "b_name": 0.30,  # share of *drawn character names* that start with "B"
    "number": 0.40,  # share of stories with a digit number
    "number_word": 0.35,  # share of stories with a number word (two..twelve)
}


def _alternation(words: Iterable[str]) -> str:
    return "|".join(sorted(words, key=len, reverse=True))


PATTERNS: dict[str, str] = {
    # Capitalised English month names as whole words ("may" the verb is not matched).
    "month": r"\b(?:" + _alternation(MONTHS) + r")\b",
    # Four-digit years 1000-2099 standing alone.
    "year": r"\b(?:1\d{3}|20\d{2})\b",
    # Character names from B_NAMES (capitalised, whole word).
    "b_name": r"\b(?:" + _alternation(B_NAMES) + r")\b",
    # Stand-alone numbers of one to three digits (years are four digits, so excluded).
    "number": r"\b\d{1,3}\b",
    # Number words two..twelve in any case ("one" is left out: "one day", "no one").
    "number_word": r"(?i)\b(?:" + _alternation(NUMBER_WORDS) + r")\b",
}

# Distinct words that signal each topic. Generated stories use a topic's lexicon words
# only in stories of that topic (the tests check this), so hits are clean ground truth.
LEXICONS: dict[str, frozenset[str]] = {
    "dragon": frozenset(
        "dragon dragons wings cave scales roar roared fly flew tail claws egg treasure gold "
        "mountain giant teeth snout hatch hatched soar soared".split()
    ),
    "flower": frozenset(
        "flower flowers garden petals seed seeds bloom bloomed water watered watering soil "
        "bee bees butterfly stem pot vase bouquet sprout grow grew rose tulip daisy "
        "sunflower poppy daffodil bluebell".split()
    ),
    "fire": frozenset(
        "fire fires fireplace flames smoke campfire firefighter firefighters truck hose "
        "siren burn burning hot sparks logs wood marshmallow marshmallows alarm ash".split()
    ),
    "princess": frozenset(
        "princess castle crown queen king prince royal gown throne tower jewels palace "
        "knight kingdom tiara dance carriage curtsied sparkly".split()
    ),
    "football": frozenset(
        "football ball kick kicked kicking goal goals team field score scored coach match "
        "player players net whistle boots jerseys pass passed keeper referee".split()
    ),
    "baby": frozenset(
        "baby crib rattle bottle stroller diaper lullaby cradle tiny newborn sister brother "
        "cry cried crying nap peekaboo blanket cuddled milk toes hospital".split()
    ),
    "slide": frozenset(
        "slide slides slid sliding playground ladder climb climbed whee slippery swings "
        "sandbox seesaw twisty bottom bars".split()
    ),
    "friend": frozenset(
        "friend friends share shared sharing together hug hugged lonely sorry forgive "
        "promise promised secret playdate invited welcome shy alone".split()
    ),
    "cake": frozenset(
        "cake cakes bake baked baking oven flour sugar frosting candles birthday butter "
        "sprinkles slice bowl stirred chocolate recipe apron batter spoon".split()
    ),
    "boat": frozenset(
        "boat boats sail sails sailed waves wave sea lake oars rowed captain anchor fish "
        "fishing dock island floated ship shore deck seagulls".split()
    ),
    "snow": frozenset(
        "snow snowman snowball snowballs snowflakes snowy sled sledding mittens scarf "
        "icicles shovel igloo winter frozen ice skates skating shivered cocoa "
        "footprints".split()
    ),
    "rocket": frozenset(
        "rocket rockets space astronaut astronauts planet planets countdown launch launched "
        "blast spacesuit orbit earth comet alien crater telescope mars gravity "
        "capsule".split()
    ),
    "bike": frozenset(
        "bike bikes bicycle pedal pedals pedaled wheels wheel training brakes handlebars "
        "ride riding tire tires pump spokes seat streamers basket tricycle balance".split()
    ),
    "zoo": frozenset(
        "zoo zookeeper animals lion lions mane giraffe giraffes elephant elephants trunk "
        "zebra zebras tiger hippo kangaroo flamingos peacock parrot gorilla crocodile "
        "panda".split()
    ),
    "piano": frozenset(
        "piano keys notes melody recital practice practicing lesson teacher drum drums "
        "guitar strummed violin trumpet band concert stage audience instrument "
        "musical".split()
    ),
    "doctor": frozenset(
        "doctor nurse clinic checkup sick fever cough coughed sneeze sneezed tissue "
        "throat thermometer temperature stethoscope heartbeat bandage shot lollipop "
        "medicine germs healthy".split()
    ),
}

# --------------------------------------------------------------------------- grammar
# Templates use {slot} for words and [a|b|c] for inline alternatives. {n} is a count
# that renders as digits, a number word or a vague quantity, depending on the story.

_SHARED = {
    "kind_f": (
        "little girl",
        "girl",
        "little bunny",
        "little kitten",
        "little mouse",
        "duck",
        "little lamb",
        "hedgehog",
        "little squirrel",
        "little owl",
        "piglet",
    ),
    "kind_m": (
        "little boy",
        "boy",
        "little puppy",
        "bear cub",
        "little fox",
        "frog",
        "turtle",
        "little raccoon",
        "little goat",
        "badger",
        "little penguin",
    ),
    "trait": (
        "curious",
        "cheerful",
        "happy",
        "brave",
        "clever",
        "gentle",
        "playful",
        "silly",
        "busy",
        "funny",
        "polite",
        "bouncy",
    ),
    "feel": (
        "happy",
        "glad",
        "excited",
        "proud",
        "cheerful",
        "calm",
        "thankful",
        "joyful",
        "warm inside",
        "full of joy",
    ),
    "color": (
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "pink",
        "orange",
        "white",
        "brown",
        "gray",
    ),
    "big": ("big", "huge", "large", "great", "enormous"),
    "home": (
        "little house",
        "small cottage",
        "blue house",
        "yellow house",
        "cozy home",
        "small flat above a bakery",
        "house with a red door",
        "farmhouse",
    ),
    "town": ("town", "village", "city", "neighborhood"),
    "weather": ("sunny", "windy", "cloudy", "bright", "cold", "quiet", "warm", "rainy", "foggy"),
    "time": ("morning", "afternoon", "day"),
    "things": (
        "apples",
        "birds",
        "stars",
        "rocks",
        "shells",
        "buttons",
        "pebbles",
        "clouds",
        "bugs",
        "ladybugs",
        "crayons",
        "ducks",
        "acorns",
        "snails",
        "marbles",
        "stickers",
        "leaves",
        "pinecones",
        "feathers",
        "puddles",
        "squirrels",
        "kites",
        "balloons",
    ),
    "treats": (
        "cookies",
        "apples",
        "grapes",
        "berries",
        "crackers",
        "cherries",
        "carrots",
        "pears",
        "plums",
        "nuts",
        "raisins",
        "muffins",
    ),
    "toy": ("teddy bear", "toy car", "kite", "toy robot", "wooden train", "doll"),
    "adult": ("Mom", "Dad", "Grandma", "Grandpa", "Nana", "Papa"),
    "good": ("good", "kind", "clever", "brave", "sweet", "smart", "helpful"),
    "adv": ("slowly", "quickly", "happily", "carefully", "quietly", "proudly"),
    "vague": ("a few", "some", "many"),
}

_OPEN_PLAIN = (
    "Once upon a time, there was a {kind} named {Name}.",
    "There once was a {trait} {kind} named {Name}.",
    "{Name} was a {trait} {kind} who lived in a {home} in a small {town}.",
    "Once there was a {trait} {kind} called {Name}, who loved to play outside.",
    "In a {home} near the park lived a {kind} named {Name}.",
    "Not long ago, a {trait} {kind} named {Name} lived with {Adult} in a {home}.",
    "{Name} was a {kind} who [liked|loved] to [explore|ask questions|run and jump].",
)
_OPEN_MONTH = (
    "One day in {month}, a {kind} named {Name} woke up early.",
    "It was a {weather} morning in {month}, and {Name} was ready to play.",
    "In {month}, a {trait} {kind} named {Name} lived in a {home} at the edge of the {town}.",
    "Every {month}, {Name} the {trait} {kind} counted the days until something fun happened.",
    "It was the first week of {month}, and {Name} could not sit still.",
)
_OPEN_YEAR = (
    "In {year}, there was a {trait} {kind} named {Name}.",
    "In the summer of {year}, a {kind} named {Name} lived in a small {town}.",
    "Long ago, in {year}, there lived a {kind} called {Name}.",
    "Back in {year}, {Name} was a {trait} {kind} with a big smile.",
    "This story happened in {year}, when {Name} was a {trait} {kind}.",
)
_OPEN_BOTH = (
    "One {weather} day in {month} {year}, a {kind} named {Name} went outside to play.",
    "In {month} of {year}, there lived a {trait} {kind} named {Name}.",
    "It was {month} {year}, and {Name} the {kind} was bored at home.",
)
_END_PLAIN = (
    "From that day on, {Name} was very {feel}.",
    "It was the best day ever.",
    "That night, {Name} went to bed with a big smile.",
    "{Name} could not wait to do it all again.",
    "{Name} thanked {Adult} and ran home, feeling {feel}.",
    "And {Name} lived happily ever after.",
    "{Name} told {Adult} all about it at dinner.",
)
_END_MONTH = (
    "{Name} would always remember that day in {month}.",
    "It was the best day of {month}.",
    "{Name} hoped that next {month} would be just as much fun.",
    "It was the happiest {month} {Name} could remember.",
)
_END_YEAR = (
    "Many years later, in {year}, {Name} still told this story.",
    "{Name} never forgot the summer of {year}.",
    "It was the happiest day of {year}.",
    "Even in {year2}, {Name} still smiled when {he} thought about that day.",
)
_FILLERS = (
    "The sun was [warm|bright] and the sky was [blue|clear].",
    "Birds were singing in the trees nearby.",
    "{Name} skipped along the path, humming a little song.",
    '{Adult} smiled and said, "You are very {good}, {Name}."',
    "It was a {weather} {time}, and {Name} felt {feel}.",
    "{Name} put on {his} {color} hat and {his} {color} shoes.",
    "A {color} bird sat on a branch and watched.",
    "{Name} ate some {treats} for a snack and felt {feel}.",
    "{Pal} from down the street came along too.",
    "{Name} clapped {his} hands and jumped up and down.",
    "A soft wind blew, and the {color} leaves danced on the ground.",
    "{Name} [giggled|laughed] so hard that {he} almost fell over.",
    "{Name} took a deep breath and felt brave.",
    "{Adult} [waved|called] from the window and told {Name} to be careful.",
    "{Name} hummed a happy tune and walked on {adv}.",
    "A [fluffy|curious|sleepy] cat watched from the fence.",
    "{Name} stopped to tie {his} shoe and then hurried on.",
    "{Name} [wondered|asked {Adult}] what would happen next.",
    "A little dog ran by, wagging happily and barking at the {things}.",
    "{Name} sat on a bench for a moment to rest {his} [tired|wobbly] legs.",
    "The [air smelled fresh|grass was soft and green|clouds looked like sheep] that {time}.",
    "{Adult} packed a lunch with sandwiches, {treats}, and lemonade.",
    "{Name} wore {his} favorite {color} sweater, the one with [big buttons|a pocket|stripes].",
    "Far away, church bells were ringing.",
    "{Name} felt a little nervous, but {he} did not give up.",
)
_FILLERS_DIGITS = (
    "On the way, {Name} counted {digits} {things}.",
    "{Name} had {digits} {things} in {his} pocket.",
    "{Adult} gave {Name} {digits} {treats} for later.",
    "There were {digits} {color} {things} by the road.",
    "{Name} was {age} years old and very {trait}.",
)
_FILLERS_WORDS = (
    "{Name} saw {numword} {things} by the road.",
    "{He} found {numword} {color} {things} and kept them.",
    "{Adult} packed {numword} {treats} in a {color} bag.",
    "{Name} was {agew} years old and very {trait}.",
)


@dataclass(frozen=True)
class _Grammar:
    intro: tuple[str, ...]
    middle: tuple[str, ...]  # roughly in narrative order
    end: tuple[str, ...]
    slots: dict[str, tuple[str, ...]]  # fixed once per story


_GRAMMARS: dict[str, _Grammar] = {
    "dragon": _Grammar(
        intro=(
            "{Name} found a {dcolor} dragon sleeping in a dark cave near the mountain.",
            "One morning, a {big} {dcolor} dragon landed right next to {Name}'s {home}.",
            "{Name} had always wanted to meet a real dragon, just like in {his} books.",
            "High on a mountain, {Name} saw a {dcolor} egg that was about to hatch.",
            "{Name} heard a loud roar coming from a cave behind the hill.",
            "Everyone said that dragons lived on the mountain, but nobody had seen one.",
        ),
        middle=(
            "The egg hatched, and a small {dcolor} dragon peeked out.",
            "The dragon had shiny {dcolor} scales and a long, curly tail.",
            "{Name} was a little scared of its sharp claws and big teeth.",
            "The dragon sniffed {Name} with its warm snout and blinked its [yellow|golden] eyes.",
            "It flapped its [huge|wide|strong] wings and flew over the trees.",
            "The dragon let out a [loud|happy|deep] roar that shook the ground.",
            "The dragon roared so loudly that the rocks rolled down the hill.",
            "The young dragon could not fly yet because its wings were too small.",
            "{Name} showed the dragon how to flap its wings, and soon it could fly.",
            "Inside the cave, there was a pile of gold and treasure.",
            "The dragon had {n} gold coins in its treasure pile.",
            "{Name} gave the dragon {n} {treats}, and it swished its tail.",
            "The giant dragon lowered its head so {Name} could pat its scales.",
            "{Name} polished the dragon's scales until they shone like a mirror.",
            "{Name} hopped onto its back, and they soared up into the clouds.",
            "{Name} wished {he} could soar through the sky like the dragon.",
            "The dragon curled its tail around {Name} to keep {him} warm.",
            "People in the {town} were afraid of the dragon, but {Name} was not.",
            '{Name} whispered, "Do not be sad, dragon, I will help you."',
        ),
        end=(
            "In the end, {Name} and the dragon flew over the mountain every day.",
            "The dragon gave a happy roar and flew back to its cave.",
            "{Name} learned that even a giant dragon can be gentle.",
            "Now the whole {town} knew that the dragon was kind and good.",
            "The dragon flew {Name} home, and everyone in the {town} looked up and waved.",
        ),
        slots={"dcolor": ("green", "red", "purple", "blue", "silver", "orange", "black")},
    ),
    "flower": _Grammar(
        intro=(
            "{Name} loved the {fcolor} {flower} flowers in {his} grandma's garden.",
            "One morning, {Name} found a small seed and wanted to plant it.",
            "{Name} wanted to grow the prettiest flower in the whole {town}.",
            "Behind {Name}'s {home}, there was a little garden full of flowers.",
            "{Adult} gave {Name} a packet of {flower} seeds and a little pot.",
        ),
        middle=(
            "{He} dug a hole in the soil and planted the seed.",
            "Every day, {Name} watered the seed with a small watering can.",
            "Soon a green sprout poked out of the soil.",
            "The little plant grew taller every day.",
            "{Name} pulled out the weeds so the {flower} had room.",
            "One day, the flower looked droopy because it needed water.",
            "{Name} waited and waited for the flower to bloom.",
            "Then, one {weather} morning, the {flower} bloomed.",
            "The {flower} had soft {fcolor} petals and a tall stem.",
            "A bee buzzed from flower to flower in the warm sun.",
            "{Name} was not afraid of the bees, because they were busy with the flowers.",
            "A {color} butterfly landed on the {flower} and stayed for a while.",
            "{Name} counted {n} seeds in the little packet.",
            "{Name} picked {n} flowers and put them in a vase.",
            "The flowers smelled sweet, and {Name} took a deep sniff.",
            "{Name} put the pot by the window so the flower could see the sun.",
            "{Name} pressed a {fcolor} petal inside {his} favorite book.",
            "{Name} made a bouquet of {fcolor} flowers for {Adult}.",
        ),
        end=(
            "Soon the garden was full of {fcolor} flowers, and everyone came to see them.",
            "{Name} learned that flowers need water, sun, and love to grow.",
            "{Name} gave the {flower} to {Adult}, who smiled and put it in a vase.",
            "Every spring after that, {Name} planted new seeds in the garden.",
        ),
        slots={
            "flower": ("rose", "tulip", "daisy", "sunflower", "poppy", "daffodil", "bluebell"),
            "fcolor": ("red", "yellow", "pink", "white", "purple", "orange"),
        },
    ),
    "fire": _Grammar(
        intro=(
            "On a cold evening, {Adult} built a fire in the fireplace.",
            "{Name} and {Adult} went camping and made a campfire under the stars.",
            "{Name} wanted to be a firefighter when {he} was big.",
            "One day, {Name} saw smoke coming from a house down the street.",
            "{Name}'s class visited the fire station to meet the firefighters.",
        ),
        middle=(
            "{Name} helped carry {n} pieces of wood for the fire.",
            "The flames danced red and orange, and the logs crackled.",
            "The burning logs glowed in the dark like little suns.",
            '{Adult} said, "Never touch the fire, because it is very hot."',
            "{Adult} explained that fires can burn very fast, so we must be careful.",
            "{Name} held a stick with a marshmallow over the flames.",
            "Little sparks jumped up into the dark sky.",
            "The smoke was thick and gray, so {Name} stayed far away.",
            "The fire alarm beeped, and everyone went outside.",
            "A loud siren went woo-woo as the fire truck raced down the road.",
            "{n} firefighters jumped out of the big red truck.",
            "The firefighters sprayed the flames with a long hose.",
            "The firefighter let {Name} sit in the truck and wear a [big|shiny] helmet.",
            "Soon the fire was out, and only some gray ash was left.",
            "They sat by the fire and ate {n} marshmallows each.",
        ),
        end=(
            "{Name} learned that fire is helpful but must be handled with care.",
            "The firefighters waved goodbye, and {Name} waved back.",
            "That night, {Name} fell asleep by the warm fireplace.",
            "{Name} still wanted to be a brave firefighter one day.",
        ),
        slots={},
    ),
    "princess": _Grammar(
        intro=(
            "{Name} dreamed of being a princess and living in a big castle.",
            "One day, a letter came from the castle inviting {Name} to a royal party.",
            "{Name} found a shiny crown in the attic and put it on.",
            "Far away, in a {big} kingdom, there lived a kind princess.",
            "{Name} read a book about a princess who lived in a tall tower.",
        ),
        middle=(
            "The princess wore a long {gcolor} gown and a sparkly tiara.",
            "{Name} tried on a royal gown that was much too long and laughed.",
            "The king and queen sat on a tall golden throne.",
            "The castle had a tall tower with a small window at the top.",
            "{Name} walked up {n} steps to the top of the tower.",
            "The princess waved from the tower window.",
            "The princess showed {Name} a box full of shiny jewels.",
            "A brave knight rode up to the palace on a white horse.",
            "{Name} rode in a golden carriage pulled by {n} white horses.",
            "The royal cook made a grand feast for the whole castle.",
            "The princess had a pet [unicorn|pony] that lived in the palace stable.",
            "The kingdom had a grand parade with flags and music.",
            "Everyone in the kingdom came to the royal dance.",
            "The prince bowed and asked the princess to dance.",
            "{Name} curtsied to the king and queen.",
            'The princess said, "Being royal is fun, but being kind is better."',
            "The queen put a little crown on {Name}'s head.",
        ),
        end=(
            "That night, {Name} danced in the castle until the moon came out.",
            "The king said {Name} could visit the castle any time.",
            "{Name} learned that a real princess is kind to everyone.",
            "{Name} went home, but {he} kept the sparkly crown forever.",
        ),
        slots={"gcolor": ("pink", "blue", "purple", "white", "silver", "golden")},
    ),
    "football": _Grammar(
        intro=(
            "{Name} loved to play football with the kids on {his} street.",
            "{Name}'s team had a big football match on Saturday.",
            "{Name} got new football boots and could not wait to try them.",
            "After school, {Name} went to the field to kick the ball.",
            "{Name} wanted to be the best football player in the {town}.",
        ),
        middle=(
            "{Name} tied {his} boots tight and stretched {his} legs.",
            "The team wore {tcolor} jerseys with big numbers on the back.",
            "The coach blew the whistle, and the match began.",
            "{Name} kicked the ball as hard as {he} could.",
            "{Name} made a quick pass to {Pal}, who ran toward the goal.",
            "The ball zoomed past the keeper and into the net.",
            "{Name} passed the ball to {Pal}, who scored a goal.",
            "By half time, {Name}'s team had scored {n} goals.",
            "The score was tied, and everyone was nervous.",
            "{Name} ran across the field, and the crowd cheered.",
            "The other team's keeper was very tall and fast.",
            "{Name}'s kick hit the post, and {he} felt sad for a moment.",
            'The coach said, "Keep your eyes on the ball and try again."',
            "{Name} practiced kicking the ball {n} times every day.",
            "It started to rain, but the players kept going.",
            "The referee pointed at the spot, and all the players held their breath.",
        ),
        end=(
            "In the last minute, {Name} kicked the ball into the net, and the team won.",
            "The players cheered and lifted {Name} up high.",
            "{Name} learned that football is more fun when the whole team plays well.",
            "After the match, the coach said {Name} was the best player on the field.",
        ),
        slots={"tcolor": ("red", "blue", "green", "yellow", "orange", "white")},
    ),
    "baby": _Grammar(
        intro=(
            "{Name} had a new baby {pal_sib} named {Pal}.",
            "{Adult} came home from the hospital with a tiny newborn baby.",
            "{Name} was excited because {Adult} said a baby was coming.",
            "Next door lived a little baby who cried every night.",
        ),
        middle=(
            "The baby had tiny hands and tiny toes.",
            "The baby started to cry, and nobody knew why.",
            "{Name} shook a rattle, and the baby giggled.",
            "When the baby cried, {Adult} gave it a warm bottle of milk.",
            "The baby slept in a little crib with a {color} blanket.",
            "{Name} sang a soft lullaby to help the baby fall asleep.",
            "{Name} and {Adult} took the baby for a walk in the stroller.",
            "{Name} played peekaboo, and the baby laughed and laughed.",
            "The baby tried to crawl across the rug.",
            "{Adult} changed the baby's diaper, and {Name} held {his} nose.",
            "The baby grabbed {Name}'s finger and would not let go.",
            "{Name} gave the baby {n} soft toys to play with.",
            "{Name} helped give the baby a bath with lots of bubbles.",
            "It was time for the baby's nap, so everyone was very quiet.",
            "{Name} gently rocked the cradle until the crying stopped.",
            "The baby's first word was {Name}'s name.",
        ),
        end=(
            "{Name} was proud to be a big {main_sib}.",
            "The baby cuddled up to {Name} and smiled.",
            "{Name} loved the tiny baby more than anything in the world.",
            "{Name} said {he} would always look after the baby.",
        ),
        slots={},
    ),
    "slide": _Grammar(
        intro=(
            "{Name} went to the playground to play on the big slide.",
            "There was a new twisty slide at the park, and {Name} wanted to try it.",
            "{Name} was a little afraid of the tall slide at the playground.",
            "After lunch, {Adult} took {Name} to the playground.",
            "The playground had {n} slides, and {Name} wanted to try them all.",
        ),
        middle=(
            "Next to the slide there were swings, a seesaw, and a sandbox.",
            "Some slides were straight, and some were twisty.",
            "A long line of kids waited to climb the slide.",
            "{Name} climbed up the ladder, step by step.",
            "The ladder was tall, but {Name} climbed it slowly and carefully.",
            "{Name} and {Pal} raced each other to climb to the top.",
            "At the top, {Name} sat down and held on tight.",
            '"Whee!" shouted {Name} as {he} slid all the way down.',
            "The slide was shiny and slippery, so {Name} went very fast.",
            "{Name} landed in the sand at the bottom of the slide and laughed.",
            "{Pal} was waiting at the bottom of the slide.",
            "{Name} went down the slide {n} times before lunch.",
            "{Name} tried sliding down on {his} tummy.",
            "Then {Name} hung from the monkey bars for a little while.",
            "{Name} helped a smaller kid climb up the ladder.",
        ),
        end=(
            "{Name} was not scared of the slide anymore.",
            "Before going home, {Name} slid down the slide one last time.",
            "The playground was {Name}'s favorite place in the whole {town}.",
            '{Name} shouted "Whee!" all the way home.',
        ),
        slots={},
    ),
    "friend": _Grammar(
        intro=(
            "{Name} moved to a new {town} and did not have any friends.",
            "{Name} felt lonely because nobody wanted to play.",
            "One day, a shy {pal_kind} named {Pal} moved in next door.",
            "{Name} and {Pal} were best friends.",
        ),
        middle=(
            '{Name} walked up to {Pal} and said, "Hi, do you want to be my friend?"',
            '{Pal} smiled and said, "Yes, I would love to be your friend!"',
            "{Pal} was shy at first, but {Name} made {pal_him} feel welcome.",
            "They played together all afternoon.",
            "{Name} shared {n} {treats} with {Pal}.",
            '"It is nice to share," {Adult} said with a smile.',
            "Sharing made {Name} feel warm inside.",
            "When {Pal} fell down, {Name} helped {pal_him} up and gave {pal_him} a hug.",
            "They built {n} sandcastles together.",
            "{Pal} helped {Name} find {his} lost {toy}.",
            "One day, they had a fight over a toy, and both felt sad.",
            '{Name} said, "I am sorry," and {Pal} said, "I forgive you."',
            "{Name} told {Pal} a secret, and {Pal} promised not to tell.",
            "{Name} invited {Pal} to a playdate at {his} {home}.",
            "{Name} drew a picture of {Pal} and gave it to {pal_him}.",
            "Being alone was no fun, but playing with a friend was great.",
        ),
        end=(
            "From then on, {Name} and {Pal} did everything together.",
            "{Name} learned that a good friend is worth more than any toy.",
            "{Name} was never lonely again, because {he} had a true friend.",
            "{Name} and {Pal} hugged and made a promise to always be friends.",
        ),
        slots={},
    ),
    "cake": _Grammar(
        intro=(
            "It was {Adult}'s birthday, so {Name} wanted to bake a cake.",
            "{Name} and {Adult} decided to bake a chocolate cake.",
            "{Name} smelled something sweet coming from the oven.",
            "{Name} wanted to make a big cake for {Pal}'s birthday.",
            "The cakes in the bakery window looked so yummy that {Name} wanted to make one.",
        ),
        middle=(
            "They followed the recipe step by step.",
            "{Name} put on a little apron and washed {his} hands.",
            "They put flour, sugar, and butter into a big bowl.",
            "{Name} stirred the batter with a big spoon.",
            "Oops, {Name} bumped the bowl, and flour went everywhere.",
            "{Name} licked the spoon, and it tasted [sweet|yummy].",
            "{Adult} put the cake in the oven to bake.",
            "The cake baked slowly, and {Name} watched through the oven door.",
            "The kitchen smelled of chocolate and sugar.",
            "They let the cake cool on the kitchen table.",
            "When the cake was ready, {Name} spread {ccolor} frosting on top.",
            "{Name} put {n} strawberries on top of the cake.",
            "{Name} added {n} candles and lots of colorful sprinkles.",
            "Everyone sang happy birthday and blew out the candles.",
            "{Name} cut a big slice for everyone.",
        ),
        end=(
            "It was the yummiest cake {Name} had ever tasted.",
            "{Name} learned that baking is more fun with someone you love.",
            "Everyone ate the cake, and soon only crumbs were left.",
            "{Name} wanted to bake a cake every birthday from then on.",
        ),
        slots={"ccolor": ("pink", "white", "blue", "yellow", "green")},
    ),
    "boat": _Grammar(
        intro=(
            "{Name} and {Adult} went out in a little boat on the lake.",
            "{Name} wanted to sail a boat all the way across the sea.",
            "{Name} found an old wooden boat on the shore.",
            "{Name} made a toy boat out of paper and took it to the lake.",
            "{Name}'s uncle was a captain with a big ship.",
        ),
        middle=(
            "{Name} put on a bright {color} life jacket.",
            "The boat rocked gently on the waves.",
            "{Name} pulled the oars, and they rowed away from the dock.",
            "The wind filled the white sails, and the boat sailed fast.",
            "{Name} saw {n} fish jumping near the boat.",
            "The captain let {Name} steer the ship.",
            "The boat had a little bell, and {Name} rang it.",
            "Seagulls called above the deck.",
            "They saw a tall lighthouse on the shore.",
            "They dropped the anchor near a small island.",
            "{Name} caught a fish with {his} fishing rod.",
            "A big wave splashed over the side, and {Name} got wet.",
            "The captain told a story about a big storm at sea.",
            "The toy boat floated past {n} ducks.",
        ),
        end=(
            "When the sun went down, they sailed back to the dock.",
            "{Name} wanted to be a captain one day.",
            "{Name} said it was the best trip on the sea ever.",
            "{Name} waved goodbye to the boats and walked up the shore.",
        ),
        slots={},
    ),
    "snow": _Grammar(
        intro=(
            "{Name} woke up and saw that everything outside was white with snow.",
            "It snowed all night, and in the morning the whole {town} was covered in snow.",
            "{Name} got a new {scolor} sled and could not wait for the first snow of winter.",
            "{Name} pulled on {his} {scolor} mittens and ran out into the snow.",
            "On a snowy winter morning, {Adult} took {Name} to the big hill behind the {town}.",
        ),
        middle=(
            "Big white snowflakes drifted down from the gray sky.",
            "{Name} wrapped a warm {scolor} scarf around {his} neck.",
            "{Name} left a long line of footprints in the fresh snow.",
            "{Name} rolled a big snowball across the yard to make a snowman.",
            "{Name} gave the snowman a carrot nose and {n} pebbles for buttons.",
            "{Name} and {Pal} had a snowball fight, and {Name} threw {n} snowballs.",
            "{Name} pulled the sled all the way up the snowy hill.",
            "The sled zoomed down the hill, and {Name} shouted with joy.",
            "They went sledding {n} times before lunch.",
            "{Name} lay down in the snow and made a snow angel.",
            "Long icicles hung from the roof and sparkled in the light.",
            "The pond was frozen, so {Name} put on {his} skates and went skating on the ice.",
            "{Name} and {Pal} built a little igloo out of blocks of snow.",
            "{Name} helped {Adult} shovel the snow off the path.",
            "{Name} shivered, so they went inside for a mug of warm cocoa.",
        ),
        end=(
            "When the snow melted, {Name} waved goodbye to the snowman.",
            "{Name} sipped warm cocoa and watched the snowflakes fall outside.",
            "{Name} could not wait for the next snowy day of winter.",
            "{Name} learned that winter can be the most fun time of the year.",
        ),
        slots={"scolor": ("red", "blue", "green", "yellow", "purple", "pink")},
    ),
    "rocket": _Grammar(
        intro=(
            "{Name} wanted to be an astronaut and travel far into space.",
            "{Name} and {Adult} built a rocket out of a big cardboard box.",
            "One night, {Name} looked through a telescope and saw a {pcolor} planet.",
            "{Name} read a book about astronauts who went all the way to Mars.",
            "A shiny {rcolor} rocket stood on the launch pad at the edge of the {town}.",
        ),
        middle=(
            "{Name} had {n} toy rockets on a shelf by {his} bed.",
            "{Name} put on a puffy white spacesuit and a round helmet.",
            "{Name} sat down in the little capsule at the top of the rocket.",
            "The rocket stood on the launch pad, ready to go.",
            "The countdown began, and {Name} held {his} breath.",
            "With a big blast, the rocket launched up into the sky.",
            "Out of the window, {Name} could see the round blue Earth far below.",
            "In space there was no gravity, so {Name} bobbed around the capsule like a balloon.",
            "The rocket went around the Earth {n} times in its orbit.",
            "A bright comet zipped past the window and sparkled.",
            "{Name} counted {n} planets through the little window.",
            "The rocket landed next to a deep crater on a {pcolor} planet.",
            "A friendly little alien with {n} eyes waved hello.",
            "{Name} jumped very high, because there was almost no gravity on Mars.",
            'A voice on the radio said, "It is time for the astronauts to come home."',
        ),
        end=(
            "The rocket landed safely back on Earth, and everyone cheered.",
            "{Name} still wanted to be a real astronaut one day.",
            "That night, {Name} looked through the telescope and waved at the planets.",
            "{Name} learned that space is big and full of wonders.",
        ),
        slots={
            "rcolor": ("red", "silver", "white", "blue", "orange"),
            "pcolor": ("red", "purple", "green", "blue", "orange", "pink"),
        },
    ),
    "bike": _Grammar(
        intro=(
            "{Name} got a shiny new {bcolor} bicycle with a bell and a basket.",
            "{Name} wanted to learn to ride a bike without training wheels.",
            "{Adult} took {Name}'s old bike out of the garage and pumped up the tires.",
            "{Name} watched the big kids ride their bikes and wanted to ride too.",
            "Every {time}, {Name} liked riding {his} little tricycle around the {town}.",
        ),
        middle=(
            "{Name} put on {his} helmet and sat down on the seat.",
            "{Adult} held the back of the seat while {Name} pushed the pedals.",
            "At first the bike wobbled, and {Name} almost tipped over.",
            "{Name} pushed one pedal and then the other, and the wheels went round and round.",
            "{Adult} took off the training wheels, and {Name} felt a little scared.",
            "{Name} learned to keep {his} balance, and soon {he} was riding on {his} own.",
            "{Name} squeezed the brakes and stopped right next to {Adult}.",
            "{Name} rang the bell on the handlebars, ring, ring!",
            "Long {bcolor} streamers on the handlebars flapped in the wind.",
            "{Name} carried {n} {treats} home in the little basket.",
            "One tire went flat, so {Adult} helped {Name} pump it up.",
            "{Name} tied {n} colorful beads on the spokes of the front wheel.",
            "{Name} and {Pal} went riding along the bumpy path by the river.",
            "{Name} pedaled up the hill and then coasted down with {his} feet out.",
            "{Name} went around the block {n} times on {his} bike.",
        ),
        end=(
            "By the end of the day, {Name} could ride {his} bike without any help.",
            "{Name} parked the bicycle by the door and could not wait to ride again.",
            "{Name} learned that riding a bike takes patience.",
            "Now {Name} rides {his} bike to the park every day.",
        ),
        slots={"bcolor": ("red", "blue", "green", "yellow", "purple", "orange")},
    ),
    "zoo": _Grammar(
        intro=(
            "{Adult} took {Name} to the zoo to see all the animals.",
            "{Name}'s class went on a trip to the big zoo in the {town}.",
            "{Name} had never been to a zoo before and could not wait.",
            "{Name} wanted to see a real lion, so {Adult} took {him} to the zoo.",
            "At the zoo gate, {Name} got a map with pictures of all the animals.",
        ),
        middle=(
            "First they saw {n} lions, and the biggest lion had a fluffy golden mane.",
            "A tall giraffe stretched its long neck to eat leaves from a tree.",
            "The elephant picked up some hay with its long trunk.",
            "{n} elephants splashed and played in a muddy pool.",
            "The zebras had black and white stripes, and {Name} tried to count them.",
            "A big tiger walked back and forth behind the glass.",
            "The hippo opened its huge mouth in a big yawn.",
            "A kangaroo hopped by with a little joey in its pouch.",
            "Pink flamingos stood on one leg by the pond.",
            "A peacock spread its blue and green feathers like a fan.",
            'A colorful parrot squawked "Hello!" at {Name} from its perch.',
            "The big gorilla sat in the shade and ate a banana.",
            "The crocodile lay very still in the mud with only its eyes showing.",
            "A black and white panda munched on bamboo.",
            "The zookeeper let {Name} feed {n} carrots to a zebra.",
        ),
        end=(
            "{Name} waved goodbye to the animals and said {he} would come back soon.",
            "That night, {Name} dreamed about lions, giraffes, and elephants.",
            "{Name} decided to be a zookeeper one day.",
            "{Name} said the zoo was the best place in the whole {town}.",
        ),
        slots={},
    ),
    "piano": _Grammar(
        intro=(
            "{Name} wanted to learn to play the piano just like {Adult}.",
            "There was an old piano in {Name}'s {home}, and {Name} loved to press the keys.",
            "{Name} went to {his} first piano lesson with a kind teacher.",
            "{Name}'s school was having a big concert, and {Name} wanted to play in it.",
            "{Name} found a box of musical instruments in the attic.",
        ),
        middle=(
            "The piano had {n} black keys and lots of white keys.",
            "{Name} pressed the keys softly at first, then loudly.",
            "The teacher showed {Name} how to play {n} notes in a row.",
            "{Name} did {his} piano practice every day after school.",
            "At first {Name} played the wrong notes, but {he} kept practicing.",
            "{Pal} banged on a drum, and {Name} laughed.",
            "{Adult} strummed a guitar while {Name} played the piano.",
            "An older kid played a sweet melody on the violin.",
            "{Name} tried to blow a trumpet, but it only made a funny noise.",
            "They made a little band with a piano, a guitar, and {n} drums.",
            "On the day of the recital, {Name} walked onto the stage.",
            "{Name}'s hands shook a little as {he} sat down at the piano.",
            "The audience was very quiet when {Name} began to play.",
            "{n} people in the audience clapped and cheered.",
            "Every instrument in the band had its own special sound.",
        ),
        end=(
            "When the concert ended, the audience clapped and {Name} took a bow.",
            "{Name} learned that practice makes every melody sound better.",
            "From then on, {Name} played the piano every day.",
            "{Adult} said it was the most beautiful music in the world.",
        ),
        slots={},
    ),
    "doctor": _Grammar(
        intro=(
            "{Name} woke up with a sore throat and a runny nose.",
            "{Name} felt sick, so {Adult} took {him} to see the doctor.",
            "{Name} fell and hurt {his} arm, so {Adult} took {him} to the clinic.",
            "It was time for {Name}'s checkup at the doctor's office.",
            "{Name} wanted to be a doctor and help people feel better.",
        ),
        middle=(
            "{Name} sneezed {n} times, and {Adult} gave {him} a tissue.",
            "{Name} had a little cough and did not want to eat.",
            "In the waiting room, {Name} read a book about germs.",
            "A kind nurse said hello and measured how tall {Name} was.",
            "The nurse put a thermometer in {Name}'s mouth to take {his} temperature.",
            "The doctor listened to {Name}'s heartbeat with a cold stethoscope.",
            '{Name} opened wide and said "ahh" so the doctor could look at {his} throat.',
            "The doctor gently wrapped a {bcolor} bandage around {Name}'s arm.",
            "{Name} had to get a shot, but it only hurt for a second.",
            "{Name} was brave during the shot, and the nurse gave {him} a lollipop.",
            "The doctor gave {Name} some medicine that tasted like cherries.",
            "{Name} took {his} medicine {n} times a day.",
            "{Name} coughed into {his} elbow to keep the germs away.",
            "{Name} tried not to sneeze on {Pal}, because sneezes spread germs.",
            "{Name} stayed in bed and ate warm soup until the fever went away.",
        ),
        end=(
            "Soon {Name} was healthy again and ran outside to play.",
            "{Name} learned that a doctor helps us feel better.",
            "{Name} thanked the doctor and the nurse and waved goodbye.",
            "{Name} was not afraid of going to the doctor anymore.",
        ),
        slots={"bcolor": ("white", "blue", "pink", "green", "yellow")},
    ),
}

_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")
_TOKEN_RE = re.compile(r"[a-z]+")
_WORD_RE = re.compile(r"\S+")
_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeio]|u(?!ni|se))")
_MIN_WORDS, _MAX_WORDS = 60, 150
_MAX_SENTS = 8
_MIN_LEXICON = 3  # distinct topic-lexicon words every story must contain
_TAIL_RATE = 0.3
_HINT_RATE = 0.5
_TAILS = (
    ", and {Name} felt {feel}",
    ", and {Name} smiled a big smile",
    " while {Adult} watched {adv}",
    ", and it was [so much fun|wonderful|amazing]",
    ", and {Name} [laughed|giggled|grinned]",
    " on that {weather} {time}",
)


# A sentence after the opening that names the topic early, as TinyStories often does in
# its first lines. Without it the topic would never be in context before the intro, and
# a model could not learn to let an earlier mention of the topic choose the intro.
_HINTS: dict[str, tuple[str, ...]] = {
    "dragon": ("{He} loved stories about dragons.", "{Name} dreamed of dragons and caves."),
    "flower": ("{He} loved flowers more than anything.", "{Name} liked to help in the garden."),
    "fire": ("{He} loved to watch a fire crackle.", "{Name} liked fire trucks and firefighters."),
    "princess": ("{He} loved stories about a princess.", "{Name} liked to wear a toy crown."),
    "football": ("{He} loved to play football.", "{Name} liked to kick a ball in the park."),
    "baby": ("{He} liked to help with the new baby.", "{Name} wanted a baby sister."),
    "slide": ("{He} loved the big slide at the playground.", "{Name} liked to climb and slide."),
    "friend": ("{He} wanted a new friend.", "{Name} liked to make new friends."),
    "cake": ("{He} loved to bake cakes.", "{Name} liked chocolate cake more than anything."),
    "boat": ("{He} loved boats and the sea.", "{Name} liked to watch the boats sail by."),
    "snow": ("{He} loved to play in the snow.", "{Name} liked to go sledding in winter."),
    "rocket": ("{He} loved rockets and outer space.", "{Name} dreamed of being an astronaut."),
    "bike": ("{He} loved to ride {his} bike.", "{Name} wanted a bike with a basket."),
    "zoo": ("{He} loved to visit the zoo.", "{Name} liked elephants and giraffes best."),
    "piano": ("{He} loved to play the piano.", "{Name} liked every musical instrument."),
    "doctor": (
        "{He} wanted to be a doctor one day.",
        "{Name} liked to play doctor with {his} toys.",
    ),
}


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (runs of a-z)."""
    return _TOKEN_RE.findall(text.lower())


def _digits(rng: random.Random) -> str:
    if rng.random() < 0.85:
        return str(rng.randint(2, 12))
    return str(rng.choice((15, 20, 25, 30, 50, 100)))


def _render(template: str, ctx: dict, rng: random.Random) -> str:
    """Fill one template: [a|b] alternatives, then {slot}s; capitalise the start."""

    def fill(m: re.Match) -> str:
        value = ctx[m.group(1)]
        if isinstance(value, str):
            return value
        if callable(value):
            return value(rng)
        return rng.choice(value)

    text = _ALT_RE.sub(lambda m: rng.choice(m.group(1).split("|")), template)
    text = _SLOT_RE.sub(fill, text)
    text = _ARTICLE_RE.sub(r"\1n ", text)
    i = 1 if text.startswith('"') else 0
    return text[:i] + text[i].upper() + text[i + 1 :]


def _pick_name(rng: random.Random, avoid: str = "") -> tuple[str, str]:
    pool = _B_NAMES_G if rng.random() < FEATURE_RATES["b_name"] else _OTHER_NAMES_G
    while True:
        name, gender = rng.choice(pool)
        if name != avoid:
            return name, gender


def _context(rng: random.Random, grammar: _Grammar, digits: bool, words: bool) -> dict:
    name, gender = _pick_name(rng)
    pal, pal_gender = _pick_name(rng, avoid=name)
    year = rng.randint(1900, 2024)
    he, him, his = ("she", "her", "her") if gender == "f" else ("he", "him", "his")
    ctx: dict = dict(_SHARED)
    ctx.update(
        Name=name,
        Pal=pal,
        he=he,
        He=he.capitalize(),
        him=him,
        his=his,
        His=his.capitalize(),
        kind=rng.choice(_SHARED["kind_f" if gender == "f" else "kind_m"]),
        pal_kind=rng.choice(_SHARED["kind_f" if pal_gender == "f" else "kind_m"]),
        pal_him="her" if pal_gender == "f" else "him",
        pal_sib="sister" if pal_gender == "f" else "brother",
        main_sib="sister" if gender == "f" else "brother",
        Adult=rng.choice(_SHARED["adult"]),
        month=rng.choice(MONTHS),
        year=str(year),
        year2=str(min(2099, year + rng.randint(10, 40))),
        age=str(rng.randint(3, 9)),
        agew=NUMBER_WORDS[rng.randint(1, 7)],
        digits=_digits,
        numword=NUMBER_WORDS,
    )
    for slot, options in grammar.slots.items():
        ctx[slot] = rng.choice(options)
    forms = [f for f, ok in ((_digits, digits), (NUMBER_WORDS, words)) if ok]
    ctx["n"] = (lambda r: _pick_form(r, forms)) if forms else _SHARED["vague"]
    return ctx


def _pick_form(rng: random.Random, forms: list) -> str:
    form = rng.choice(forms)
    return form(rng) if callable(form) else rng.choice(form)


def _frame(rng: random.Random, month: bool, year: bool) -> tuple[str, str | None]:
    """Choose opening and (optional) ending templates carrying the month/year features."""
    if month and year:
        if rng.random() < 0.5:
            return rng.choice(_OPEN_BOTH), rng.choice(_END_PLAIN + (None,))
        if rng.random() < 0.5:
            return rng.choice(_OPEN_MONTH), rng.choice(_END_YEAR)
        return rng.choice(_OPEN_YEAR), rng.choice(_END_MONTH)
    for flag, opens, ends in ((month, _OPEN_MONTH, _END_MONTH), (year, _OPEN_YEAR, _END_YEAR)):
        if flag:
            if rng.random() < 0.6:
                return rng.choice(opens), rng.choice(_END_PLAIN + (None,))
            return rng.choice(_OPEN_PLAIN), rng.choice(ends)
    return rng.choice(_OPEN_PLAIN), rng.choice(_END_PLAIN + (None, None))


def _with_tail(template: str, rng: random.Random) -> str:
    """Sometimes lengthen a plain sentence with a shared closing clause."""
    if template.endswith('."') or rng.random() >= _TAIL_RATE:
        return template
    return template[:-1] + rng.choice(_TAILS) + template[-1]


def _one_story(rng: random.Random, topic: str) -> Story:
    grammar = _GRAMMARS[topic]
    month = rng.random() < FEATURE_RATES["month"]
    year = rng.random() < FEATURE_RATES["year"]
    digits = rng.random() < FEATURE_RATES["number"]
    words = rng.random() < FEATURE_RATES["number_word"]
    for _ in range(100):
        ctx = _context(rng, grammar, digits, words)
        opening, ending = _frame(rng, month, year)
        room = _MAX_SENTS - 3 - (ending is not None) - digits - words
        hint = room > 2 and rng.random() < _HINT_RATE
        room -= hint
        n_fill = 1 if room > 2 and rng.random() < 0.4 else 0
        n_mid = rng.randint(2, room - n_fill)
        picks = sorted(rng.sample(range(len(grammar.middle)), n_mid))
        middle = [_with_tail(grammar.middle[i], rng) for i in picks]
        if n_fill:
            middle.insert(rng.randint(0, len(middle)), rng.choice(_FILLERS))
        head = [_render(opening, ctx, rng), _render(rng.choice(grammar.intro), ctx, rng)]
        if hint:
            head.insert(1, _render(rng.choice(_HINTS[topic]), ctx, rng))
        body = [_render(t, ctx, rng) for t in middle]
        tail = [_render(rng.choice(grammar.end), ctx, rng)]
        if ending is not None:
            tail.append(_render(ending, ctx, rng))
        so_far = " ".join(head + body + tail)
        for flag, key, fillers in (
            (digits, "number", _FILLERS_DIGITS),
            (words, "number_word", _FILLERS_WORDS),
        ):
            if flag and not re.search(PATTERNS[key], so_far):
                extra = _render(rng.choice(fillers), ctx, rng)
                body.insert(rng.randint(0, len(body)), extra)
        text = " ".join(head + body + tail)
        if (
            _MIN_WORDS <= len(_WORD_RE.findall(text)) <= _MAX_WORDS
            and lexicon_hits(text, topic) >= _MIN_LEXICON
        ):
            return Story(text=text, topic=topic)
    raise RuntimeError(f"could not build a story for topic {topic!r}")  # pragma: no cover


def generate_stories(n: int, seed: int = 0, topics: Sequence[str] = TOPICS) -> list[Story]:
    """Generate ``n`` stories, deterministically per ``seed``, with balanced topics.

    Topics are dealt in shuffled rounds, so each topic's count differs by at most one.
    The first ``k`` stories of ``generate_stories(n, seed)`` equal ``generate_stories(k, seed)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    topics = tuple(topics)
    if not topics:
        raise ValueError("topics must not be empty")
    unknown = [t for t in topics if t not in _GRAMMARS]
    if unknown:
        raise ValueError(f"unknown topics {unknown}; known: {list(_GRAMMARS)}")
    rng = random.Random(seed)
    stories: list[Story] = []
    order: list[str] = []
    for _ in range(n):
        if not order:
            order = list(topics)
            rng.shuffle(order)
        stories.append(_one_story(rng, order.pop()))
    return stories


def feature_rates(texts: Iterable[str]) -> dict[str, float]:
    """Share of texts in which each `PATTERNS` regex matches at least once."""
    compiled = {k: re.compile(p) for k, p in PATTERNS.items()}
    hits = Counter()
    total = 0
    for text in texts:
        total += 1
        for key, rx in compiled.items():
            if rx.search(text):
                hits[key] += 1
    return {k: hits[k] / total if total else 0.0 for k in PATTERNS}


def lexicon_hits(text: str, topic: str) -> int:
    """Number of distinct `LEXICONS` words of ``topic`` present in ``text``."""
    if topic not in LEXICONS:
        raise ValueError(f"unknown topic {topic!r}")
    return len(LEXICONS[topic].intersection(tokenize(text)))


class TopicClassifier:
    """Multinomial naive Bayes topic classifier over lowercased word unigrams.

    By default word counts are binarised per document (each distinct word counts once),
    so repeating a single token, e.g. a forced topic word, cannot outweigh the rest of
    the text. Words unseen in training are ignored.

    Steering evaluation: a steered generation counts as on-topic when the classifier's
    top topic is the target topic (`is_on_topic` with the default threshold 0.5
    additionally asks for a posterior of at least 0.5). `lexicon_hits` is a
    second, interpretable check.
    """

    def __init__(
        self,
        topics: Sequence[str],
        log_prior: Sequence[float],
        log_like: dict[str, tuple[float, ...]],
        binary: bool = True,
    ) -> None:
        self.topics = tuple(topics)
        self.log_prior = tuple(log_prior)
        self.log_like = log_like
        self.binary = binary

    @classmethod
    def fit(
        cls, stories: Iterable[Story], alpha: float = 1.0, binary: bool = True
    ) -> TopicClassifier:
        """Fit on labelled stories with add-``alpha`` smoothing; returns a new classifier."""
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        counts: dict[str, Counter] = {}
        docs: Counter = Counter()
        for story in stories:
            tokens = tokenize(story.text)
            counts.setdefault(story.topic, Counter()).update(set(tokens) if binary else tokens)
            docs[story.topic] += 1
        if not docs:
            raise ValueError("cannot fit on zero stories")
        topics = sorted(docs)
        vocab = set().union(*counts.values())
        n_docs = sum(docs.values())
        log_prior = [math.log(docs[t] / n_docs) for t in topics]
        denom = [math.log(sum(counts[t].values()) + alpha * len(vocab)) for t in topics]
        log_like = {
            w: tuple(math.log(counts[t][w] + alpha) - d for t, d in zip(topics, denom, strict=True))
            for w in vocab
        }
        return cls(topics, log_prior, log_like, binary=binary)

    def _scores(self, text: str) -> list[float]:
        tokens = tokenize(text)
        scores = list(self.log_prior)
        items = Counter(set(tokens) if self.binary else tokens).items()
        for word, count in items:
            row = self.log_like.get(word)
            if row is not None:
                for i, v in enumerate(row):
                    scores[i] += count * v
        return scores

    def predict_proba(self, texts: Iterable[str]) -> list[dict[str, float]]:
        """Posterior probability of each topic, per text."""
        out = []
        for text in texts:
            scores = self._scores(text)
            top = max(scores)
            exp = [math.exp(s - top) for s in scores]
            total = sum(exp)
            out.append({t: e / total for t, e in zip(self.topics, exp, strict=True)})
        return out

    def predict(self, texts: Iterable[str]) -> list[str]:
        """Most probable topic, per text."""
        out = []
        for text in texts:
            scores = self._scores(text)
            out.append(self.topics[max(range(len(scores)), key=scores.__getitem__)])
        return out

    def is_on_topic(self, text: str, topic: str, threshold: float = 0.5) -> bool:
        """True when ``topic`` is the top topic with posterior >= ``threshold``."""
        if topic not in self.topics:
            raise ValueError(f"unknown topic {topic!r}; known: {list(self.topics)}")
        proba = self.predict_proba([text])[0]
        return max(proba, key=proba.__getitem__) == topic and proba[topic] >= threshold

    @staticmethod
    def lexicon_hits(text: str, topic: str) -> int:
        """Same as the module-level `lexicon_hits`."""
        return lexicon_hits(text, topic)


def write_corpus(
    path: str | os.PathLike, n: int, seed: int = 0, topics: Sequence[str] = TOPICS
) -> Path:
    """Write ``n`` generated stories as JSON lines ``{"text", "topic"}``, atomically."""
    path = Path(path)
    stories = generate_stories(n, seed=seed, topics=topics)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for story in stories:
                f.write(json.dumps({"text": story.text, "topic": story.topic}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_corpus(path: str | os.PathLike) -> list[Story]:
    """Read a JSON-lines corpus written by `write_corpus`; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    stories = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in ("text", "topic") if k not in record]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {missing}")
            if not isinstance(record["text"], str) or not isinstance(record["topic"], str):
                raise ValueError(f"{path}:{lineno}: 'text' and 'topic' must be strings")
            stories.append(Story(text=record["text"], topic=record["topic"]))
    return stories
