"""coco-caption's PTB tokenization in pure Python (no Java).

coco-caption (`pycocoevalcap.tokenizer.PTBTokenizer`) joins all captions with newlines, pipes them
through Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` (a JFlex lexer, run in a
JVM) and then drops its punctuation tokens. This module re-implements that lexer's rules (the
`PTBLexer.flex` of CoreNLP 3.4.1 with its default options plus `tokenizeNLs`) with Python regular
expressions, so the metrics need no Java:

* JFlex semantics: at each position every rule is tried, the longest match wins (for a rule with
  trailing context `r1/r2` the match length counts `r2` too, the token is `r1`), ties go to the
  rule written first, and some actions push characters back. Literal text in the spec is
  case-insensitive (`%caseless`), character classes are not.
* The lexer works on UTF-16 code units of the Basic Multilingual Plane, so `[:letter:]`,
  `[:digit:]` and `[:uppercase:]` are built here from `unicodedata` for U+0000-U+FFFF only;
  characters beyond (emoji) are untokenizable and deleted, as in Java.
* Each token is lower-cased as Java's `toLowerCase(Locale.ENGLISH)` does (`str.lower`, except
  for where a Greek capital sigma counts as word-final), tokens are joined with spaces per input
  line, and coco-caption's punctuation list is removed.
* Python's regex alternation takes the first alternative that fits, JFlex the longest one; rules
  are split into their alternatives or ordered, and a few search for longer matches (`span`).

Because coco-caption tokenizes all captions as one text, a few rules look across the line break
into the next caption (an abbreviation or single letter with a period at the end of a caption,
for example). `tokenize_captions` reproduces that exactly; `ptb_tokenize` tokenizes one caption
as if it were the whole input.
"""

import functools
import re
import unicodedata

# coco-caption removes these tokens after tokenizing (pycocoevalcap/tokenizer/ptbtokenizer.py).
PUNCTUATIONS = frozenset([
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
    "--", "...", ";"])

_NEWLINE_TOKEN = None  # what the lexer returns for a line break (CoreNLP's "*NL*")
# Characters the lexer treats as a line break. coco-caption replaces only "\n" inside a caption,
# so any of the others would shift every later caption onto the wrong line there; here they are
# read as spaces instead.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c]")

# JFlex 1.5.1, which generated CoreNLP 3.4.1's lexer, knows Unicode 6.1: the letters and decimal
# digits of the BMP that Unicode assigned later are untokenizable there (found by running every
# BMP character through the jar) ...
_ADDED_AFTER_UNICODE_6_1 = (
    "\u037f\u0528-\u052f\u0560\u0588\u05ef\u0860-\u086a\u0870-\u0887\u0889-\u088e\u08a1"
    "\u08ad-\u08c9\u0978\u0980\u09fc\u0af9\u0c34\u0c5a\u0c5d\u0c80\u0cdd\u0d04\u0d54-\u0d56"
    "\u0d5f\u0de6-\u0def\u0e86\u0e89\u0e8c\u0e8e-\u0e93\u0e98\u0ea0\u0ea8-\u0ea9\u0eac\u13f5"
    "\u13f8-\u13fd\u16f1-\u16f8\u170d\u171f\u1878\u191d-\u191e\u19b0-\u19c0\u19c8-\u19c9"
    "\u1b4c\u1c80-\u1c88\u1c90-\u1cba\u1cbd-\u1cbf\u1cf2-\u1cf3\u1cfa\u2c2f\u2c5f\u312e-\u312f"
    "\u31bb-\u31bf\u4db6-\u4dbf\u9fcd-\u9fff\ua698-\ua69d\ua78f\ua794-\ua79f\ua7ab-\ua7ca"
    "\ua7d0-\ua7d1\ua7d3\ua7d5-\ua7d9\ua7f2-\ua7f7\ua8fd-\ua8fe\ua9e0-\ua9e4\ua9e6-\ua9fe"
    "\uaa7e-\uaa7f\uab30-\uab5a\uab5c-\uab69\uab70-\uabbf")
# ... and two Mongolian letters that Unicode 9 made combining marks are still letters there.
_LETTERS_BEFORE_UNICODE_9 = "\u1885\u1886"


def _bmp_class(predicate) -> str:
  """Body of a regex character class: the BMP characters of Unicode 6.1 that `predicate` accepts."""
  newer = re.compile(f"[{_ADDED_AFTER_UNICODE_6_1}\\ud800-\\udfff]")
  ranges = []
  start = None
  for code in range(0x10000):
    char = chr(code)
    inside = predicate(char) and not newer.match(char)
    if inside and start is None:
      start = code
    elif not inside and start is not None:
      ranges.append((start, code - 1))
      start = None
  if start is not None:
    ranges.append((start, 0xFFFF))
  return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


def _caseless(pattern: str) -> str:
  r"""JFlex `%caseless` for a Python pattern: ASCII letters outside `[...]` match both cases.

  Escapes (`\u00AD`, `\.`), groups (`(?:`), quantifiers (`{2,4}`) and character classes are left
  as they are; the transformation is idempotent.
  """
  out = []
  i = 0
  n = len(pattern)
  while i < n:
    c = pattern[i]
    if c == "\\":
      width = {"u": 6, "x": 4}.get(pattern[i + 1], 2)
      out.append(pattern[i:i + width])
      i += width
    elif c == "[":
      j = i + 1
      while pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
      out.append(pattern[i:j + 1])
      i = j + 1
    elif c == "(" and pattern.startswith("(?", i):
      out.append(pattern[i:i + 3])
      i += 3
    elif c == "{":
      j = pattern.index("}", i)
      out.append(pattern[i:j + 1])
      i = j + 1
    elif c.isascii() and c.isalpha():
      out.append(f"[{c.lower()}{c.upper()}]")
      i += 1
    else:
      out.append(c)
      i += 1
  return "".join(out)


class _Rule:
  """One lexer rule: a pattern (group 1 is the token when the rule has trailing context).

  The pattern is compiled when a text first needs the rule: a caption meets few of the ~90 rules,
  and compiling them all took ~0.4 s of a command line's first caption.
  """

  __slots__ = ("_pattern", "_regex", "first", "action", "arg", "context", "_span", "has_span")

  def __init__(self, pattern, first, action="text", arg=None, context=False, span=None):
    self._pattern, self._regex = pattern, None
    self.first = re.compile(f"[{first}]")  # which characters the rule can start with
    self.action = action
    self.arg = arg
    self.context = context
    # Where nested alternatives can make Python's backtracking stop short of JFlex's longest
    # match: the characters a match consists of, to look for longer matches within.
    self._span, self.has_span = span, span is not None

  @property
  def regex(self) -> re.Pattern:
    if self._regex is None:
      self._regex = re.compile(_caseless(self._pattern))
    return self._regex

  @property
  def span(self) -> re.Pattern | None:
    if isinstance(self._span, str):
      self._span = re.compile(f"[{self._span}]*")
    return self._span


@functools.cache
def _rules() -> tuple[_Rule, ...]:
  """The lexer's rules in the order of PTBLexer.flex (CoreNLP 3.4.1)."""
  letters = _bmp_class(str.isalpha) + _LETTERS_BEFORE_UNICODE_9  # general categories L*
  digits = _bmp_class(str.isdecimal)  # general category Nd
  uppers = _bmp_class(str.isupper)
  # Marks and letters the spec adds to [:letter:] (some are letters already).
  extra = (r"\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
           r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
           r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A"
           r"\u063B-\u063F\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F"
           r"\u0750-\u077F\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E"
           r"\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7"
           r"\u09E2\u09E3\u0A01-\u0A03\u0A3C\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82"
           r"\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44"
           r"\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC\u0EC8-\u0ECD")
  digit_chars = digits + r"\u07C0-\u07C9"

  # Macros of PTBLexer.flex, in Python syntax (literal letters become caseless in _Rule).
  sgml = (r"<(?:[!?][A-Za-z\-][^>\r\n]*"
          r"|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*"
          r"|[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")))*[ ]*/?"
          r"|/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
  space = r"[ \t\u00A0\u2000-\u200A\u3000]"
  newline = r"(?:\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
  spacenl = f"(?:{space}|{newline})"
  sentend = f"{spacenl}(?:{spacenl}|[{uppers}]|{sgml})"
  digit = f"[{digit_chars}]"
  splet = r"&[aeiouAEIOU](?:acute|grave|uml);"
  letter = f"(?:[{letters}{extra}]|{splet})"
  letter_or_digit = f"(?:[{letters}{extra}{digit_chars}]|{splet})"
  plain_letter = f"[{letters}]"  # [:letter:]
  plain_alnum = f"[{letters}{digits}]"  # [:letter:]|[:digit:]
  word = f"{letter}{letter_or_digit}*(?:[.!?]{letter}{letter_or_digit}*)*"
  filename_ext = ("bat|bmp|class|cgi|cpp|c|dll|docx|doc|exe|gif|gz|html|htm|h|jar|java|jpeg|jpg|"
                  "mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
  filename = f"{letter_or_digit}+(?:[.]{letter_or_digit}+)*(?:[.](?:{filename_ext}))"
  apos = r"(?:['\u0092\u2019]|&apos;)"
  aposetc = r"(?:['\u0092\u2019`\u0091\u2018\u201B]|&apos;)"
  hyphen = r"[\-_\u058A\u2010\u2011]"
  thing_part = f"(?:[dDoOlL]{aposetc}{plain_alnum})?{plain_alnum}+"
  thing = f"{thing_part}(?:{hyphen}{thing_part})*"
  thinga = r"[A-Z]+(?:(?:&amp;|[+&])[A-Z]+)+"
  thing3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
  acro_special = r"(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.S\.S\.R|U\.K)"
  acro = rf"(?:{acro_special}|[A-Za-z](?:\.[A-Za-z])*)"
  acro2 = rf"(?:{acro_special}|[A-Za-z](?:\.[A-Za-z])+)"
  hthing = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:{acro2}\.|[A-Za-z0-9\u00AD]+))+"
  redaux = f"{apos}(?:[msdMSD]|re|ve|ll)"
  sword = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
  sredaux = f"n{aposetc}t"
  num_decimal = rf"{digit}*(?:[.:,\u00AD\u066B\u066C]{digit}+)+"
  url_end = r"[^ \t\n\f\r\"<>|.!?(){},\-]"
  likelyurl = (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
               r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu)))"
               rf"(?:/[^ \t\n\f\r\"<>|()]+{url_end})?")
  email_char = r"[^ \t\n\f\r\"<>|(){}.\u00A0]"
  email = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@"
           f"(?:{email_char}+\\.)*{email_char}+(?:&gt;|>)?")
  abmonth = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec"
  abdays = "Mon|Tues|Tue|Wed|Thurs|Thu|Fri"
  abstate = ("Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|"
             "[M]ass|Md|Mich|Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|"
             "[W]ash|Wisc?|Wyo")
  abcomp = "Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
  abnum = "tel|est|ext|sq"
  abptit = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
  abbrev1 = f"(?:{abmonth}|{abdays}|{abstate}|{abcomp}|{abnum}|{abptit}|etc|al|seq|Bldg)\\."
  abtitle = ("Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|"
             "Maj|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|"
             "Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc")
  abcomp2 = "Invt|Elec|Natl|M[ft]g|Dept"
  # {acro} first: Python takes the first alternative that fits, JFlex the longest.
  abbrev4 = rf"(?:{acro}|{abtitle}|vs|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{abcomp2})"
  abbrev3 = r"(?:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\."
  acronym_next = ("[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|"
                  "[H]e|[H]er|[H]ere|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|"
                  "[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|"
                  "[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et|"
                  f"[Y]ou|{sgml}")
  phone_sep = r"[\- \u00A0]"
  insentp = r"[,;:\u3001]"
  quote_chars = (r"`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F"
                 r"\u2039\u203A\u00AB\u00BB")
  smiley_face = r"[\-\^x=~<>']"
  miscsymbol = (r"+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA"
                r"\u00D7\u00F7\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A"
                r"\u060C\u0614\u061B\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965"
                r"\u0E4F\u1FBD\u2016\u2017\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044"
                r"\u207A-\u207F\u208A-\u208E\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB"
                r"\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65")

  # Possible first characters of the rules (a prefilter; it never changes the result).
  f_letter = f"{letters}{extra}&"
  f_alnum = f"{letters}{extra}{digit_chars}&"
  f_apos = "'\u0092\u2019&"
  f_ascii = "A-Za-z"
  r = _Rule
  return (
      r(r"c[+][+]", "cC"),
      r(r"(?:c|f)#", "cCfF"),
      r("cannot", "cC", "push", 3),
      r("'twas", "'", "push", 2),
      r("'tis", "'", "push", 2),
      r("gonna|gotta|lemme|gimme|wanna", "gGlLwW", "push", 3),
      r(sgml, "<", "sgml"),
      r(r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]",
        "&\u0096\u0097\u2013\u2014\u2015", "const", "--"),
      r("&amp;", "&", "amp"),
      r("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", "&"),
      r(f"({word}){redaux}", f_letter, "soft", context=True),
      r(f"({sword}){sredaux}", "A-Za-z\u00AD", "soft", context=True),
      r(word, f_letter, "soft"),
      # APOWORD, one rule per alternative so that the longest one wins.
      r(f"{apos}n{apos}?", f_apos),
      r(f"[lLdDjJ]{apos}", "lLdDjJ"),
      r(f"Dunkin{apos}|somethin{apos}|ol{apos}|{apos}em", "dDsSoO" + f_apos),
      r(f"[A-HJ-XZn]{aposetc}{plain_letter}{{2}}{plain_letter}*", "A-HJ-XZn"),
      r(f"{apos}[2-9]0s|{apos}till?|{apos}cause", f_apos),
      r(f"{plain_letter}+[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{plain_letter}*", letters),
      r(r"cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l", "cCnNeEsSlL'"),
      r(f"O{aposetc}o", "oO"),
      r(f"(y{apos}){plain_letter}", "yY", context=True),
      r(rf"https?://[^ \t\n\f\r\"<>|(){{}}]+{url_end}", "hH"),
      r(likelyurl, "^ \t\n\f\r\"`'<>|.!?(){},\\-_$"),
      r(email, "&<a-zA-Z0-9"),
      r(f"@[a-zA-Z_][a-zA-Z_0-9]*|#{letter}+", "@#"),
      r(f"({redaux})[^A-Za-z]", f_apos, "right_quote", context=True),
      r(f"({sredaux})[^A-Za-z]", "nN", "right_quote", context=True),
      r(f"{digit}{{1,2}}[\\-/]{digit}{{1,2}}[\\-/]{digit}{{2,4}}", digit_chars),
      r(f"[\\-+]?{num_decimal}", "\\-+.:,\u00AD\u066B\u066C" + digit_chars, "soft"),
      r(f"[\\-+]?{digit}+", "\\-+" + digit_chars, "soft"),
      r(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)",
        "\u207A\u207B\u208A\u208B\u2070\u00B9\u00B2\u00B3\u2074-\u2079\u2080-\u2089"),
      r(f"(?:{digit}{{1,4}}[\\- \u00A0])?{digit}{{1,4}}(?:\\\\?/|\u2044){digit}{{1,4}}",
        digit_chars, "nbsp"),
      r(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", "\u00BC\u00BD\u00BE\u2153-\u215E", "fraction"),
      r(rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&amp;|&)P-500|S(?:&amp;|&)Ls"
        f"|Cap{apos}n|c{apos}est", "\\-cCpPaAsS", "amp"),
      r(thing3, "A-Za-z0-9"),
      r(r"[A-Z]*\$|#", "A-Z$#"),
      r("[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
        "\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6",
        "currency"),
      r(f"({acro}\\.){spacenl}+(?:{acronym_next}){spacenl}", f_ascii, "acronym", context=True),
      r(f"({abbrev3}){spacenl}?[{digits}]", f_ascii, context=True),
      r(f"((?:pt[eyEY]|co)\\.){space}(?:ltd|lim)", "pPcC", context=True),
      r(f"({abbrev1}){sentend}", f_ascii, "abbrev_period", context=True),
      r(f"({abbrev1})[\\s\\S]{{2}}", f_ascii, context=True),
      r(abbrev1, f_ascii, "abbrev_period"),
      r(f"{abbrev4}\\.", f_ascii),
      r(f"({abbrev4}){space}", f_ascii, context=True),
      r(f"({acro}){spacenl}", f_ascii, context=True),
      r(f"({apos}[0-9][0-9]){spacenl}", f_apos, context=True),
      r(f"({filename})(?:{spacenl}|[.?!,])", f_alnum, context=True),
      r(f"({word}\\.){insentp}", f_letter, "soft", context=True),
      # PHONE, one rule per alternative.
      r(f"(?:\\([0-9]{{2,3}}\\)[ \u00A0]?|(?:\\+\\+?)?(?:[0-9]{{2,4}}{phone_sep})?[0-9]{{2,4}}"
        f"{phone_sep})[0-9]{{3,4}}{phone_sep}?[0-9]{{3,5}}", "(+0-9", "phone",
        span="0-9()+\\- \u00A0"),
      r(r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}", "+0-9", "phone",
        span="0-9+."),
      r("(\"|&quot;)[A-Za-z0-9$]", "\"&", "left_quote", context=True),
      r("\"|&quot;", "\"&", "right_quote"),
      r("\x7f", "\x7f", "skip"),
      r("<|&lt;", "<&", "const", "<"),
      r(">|&gt;", ">&", "const", ">"),
      r(r"([<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]])[^A-Za-z0-9]", "<>:;=", "parens", context=True),
      # ASIANSMILEY, one rule per alternative; the first is literally what the spec says.
      r(r"[\^x=~<>]\.\[\^x=~<>\]", "\\^x=~<>", "parens"),
      r(f"{smiley_face}_{smiley_face}", "\\-\\^x=~<>'", "parens"),
      r(f"\\({smiley_face}[_.]?{smiley_face}\\)", "(", "parens"),
      r(r"\([\^x=~<>']-[\^x=~<>'`]\)", "(", "parens"),
      r(r"\{", "{", "const", "-LCB-"),
      r(r"\}", "}", "const", "-RCB-"),
      r(r"\[", "\\[", "const", "-LSB-"),
      r(r"\]", "\\]", "const", "-RSB-"),
      r(r"\(", "(", "const", "-LRB-"),
      r(r"\)", ")", "const", "-RRB-"),
      r(r"-+", "\\-", "hyphens"),
      r(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", ".\u0085\u2026", "const", "..."),
      r(r"@+|#+|_+", "@#_"),
      r(r"\*+|(?:\\\*){1,3}", "*\\\\"),
      r(insentp, ",;:\u3001"),
      r(r"[?!]+", "?!"),
      r("[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]",
        ".\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002"),
      r("=", "="),
      r("/", "/"),
      r(f"({hthing}\\.){insentp}", "A-Za-z0-9", "soft", context=True,
        span="A-Za-z0-9.,\u00AD\\-;:\u3001"),
      r(hthing, "A-Za-z0-9", "soft", span="A-Za-z0-9.,\u00AD\\-"),
      r(f"({thing}\\.){insentp}", f_alnum, context=True),
      r(thing, f_alnum),
      r(f"({thinga}\\.){insentp}", "A-Z", "amp", context=True),
      r(thinga, "A-Z", "amp"),
      r("(')[A-Za-z][^ \t\n\r\u00A0]", "'", "left_quote", context=True),
      r(redaux, f_apos, "right_quote"),
      r(sredaux, "nN", "right_quote"),
      r(f"''|[{quote_chars}]{{1,2}}|{apos}", "'&" + quote_chars, "right_quote"),
      r("<<|>>", "<>"),
      r(f"[{miscsymbol}]", miscsymbol),
      r(f"{space}+|[\x00\u200B\u200E\u200F\uFEFF]",
        "\x00 \t\u00A0\u2000-\u200A\u3000\u200B\u200E\u200F\uFEFF", "skip"),
      r(newline, "\r\n\u2028\u2029\x0b\x0c\x85", "newline"),
      r("&nbsp;", "&", "skip"),
      r(r"[\s\S]", r"\s\S", "skip"),  # untokenizable: deleted
  )


@functools.cache
def _candidates(char: str) -> tuple[_Rule, ...]:
  """The rules that can match at a position holding `char`, in rule order."""
  return tuple(rule for rule in _rules() if rule.first.match(char))


# Fast path: a run of ASCII letters followed by a space, a line break or the end is one token
# under every rule (none of the rules that could match longer applies to such a run), except
# for the assimilations the lexer splits. This matches a stretch of such words.
_PLAIN_WORDS = re.compile(
    r"(?:(?!(?:[cC][aA][nN][nN][oO][tT]|[gG][oO][nN][nN][aA]|[gG][oO][tT][tT][aA]"
    r"|[lL][eE][mM][mM][eE]|[gG][iI][mM][mM][eE]|[wW][aA][nN][nN][aA])(?![A-Za-z]))[A-Za-z]++"
    r"(?:[ ][ \t\u00A0\u2000-\u200A\u3000]*+|(?=\n|\Z)))+")
_SPACES = re.compile("[ \t\u00A0\u2000-\u200A\u3000]+")
_AMP = re.compile("&[aA][mM][pP];")
_LEFT_QUOTES = {"'": "`", "&apos;": "`", '"': "``", "&quot;": "``"}
_RIGHT_QUOTES = {"'": "'", "&apos;": "'", '"': "''", "&quot;": "''"}
_LATEX_QUOTES = str.maketrans({
    "\u0091": "`", "\u2018": "`", "\u201B": "`", "\u2039": "`",
    "\u0092": "'", "\u2019": "'", "\u203A": "'",
    "\u0093": "``", "\u201C": "``", "\u00AB": "``",
    "\u0094": "''", "\u201D": "''", "\u00BB": "''"})
_STRAIGHT_QUOTE = re.compile("&apos;|'|\"|&quot;")
_FRACTIONS = str.maketrans({"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3",
                            "\u2154": "2/3"})
_CURRENCIES = str.maketrans({"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$",
                             "\u20A0": "$", "\u20AC": "$"})


def _latex_quotes(token: str, probably_left: bool) -> str:
  table = _LEFT_QUOTES if probably_left else _RIGHT_QUOTES
  token = _STRAIGHT_QUOTE.sub(lambda m: table[m.group()], token)
  return token.translate(_LATEX_QUOTES)


def _remove_soft_hyphens(token: str) -> str:
  return token.replace("\u00AD", "") or "-"


def _lex(text: str) -> list[str]:
  """PTBLexer over `text`: its tokens, with `_NEWLINE_TOKEN` for each line break."""
  tokens = []
  pos = 0
  size = len(text)
  while pos < size:
    plain = _PLAIN_WORDS.match(text, pos)
    if plain is not None:
      tokens.extend(plain.group().split())
      pos = plain.end()
      continue
    char = text[pos]
    if char == " ":
      pos = _SPACES.match(text, pos).end()
      continue
    if char == "\n":
      tokens.append(_NEWLINE_TOKEN)
      pos += 1
      continue
    best, best_end = None, pos
    for rule in _candidates(char):
      match = rule.regex.match(text, pos)
      if match is None:
        continue
      if rule.span is not None:
        for end in range(rule.span.match(text, pos).end(), match.end(), -1):
          longer = rule.regex.fullmatch(text, pos, end)
          if longer is not None:
            match = longer
            break
      if match.end() > best_end:
        best, best_end, best_match = rule, match.end(), match
    token = best_match.group(1 if best.context else 0)
    pos, token = _act(best, token, pos)
    if token is not None:
      tokens.append(token)
  return tokens


def _act(rule: _Rule, token: str, pos: int) -> tuple[int, str | None]:
  """Runs a rule's action on its matched text: (where lexing goes on, the token or None)."""
  action = rule.action
  end = pos + len(token)
  if action == "text":
    return end, token
  if action == "soft":
    return end, _remove_soft_hyphens(token)
  if action == "skip":
    return end, None
  if action == "newline":
    return end, _NEWLINE_TOKEN
  if action == "const":
    return end, rule.arg
  if action == "push":
    return pos + rule.arg, token[:rule.arg]
  if action in ("left_quote", "right_quote"):
    return end, _latex_quotes(token, action == "left_quote")
  if action == "amp":
    return end, _AMP.sub("&", token)
  if action in ("sgml", "nbsp"):
    return end, token.replace(" ", "\u00A0")
  if action in ("phone", "parens"):
    if action == "phone":
      token = token.replace(" ", "\u00A0")
    return end, token.replace("(", "-LRB-").replace(")", "-RRB-")
  if action == "hyphens":
    return end, "--" if 3 <= len(token) <= 4 else token
  if action == "fraction":
    return end, token.translate(_FRACTIONS)
  if action == "currency":
    return end, token.translate(_CURRENCIES)
  if action == "acronym":  # "I." gives "I" then "."; "U.S." gives "U.S." then "."
    if len(token) == 2:
      return pos + 1, token[0]
    return end - 1, token
  if action == "abbrev_period":  # "etc." then "." again
    return end - 1, token
  raise AssertionError(f"unknown lexer action {action!r}")


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _to_surrogates(match: re.Match) -> str:
  code = ord(match.group()) - 0x10000
  return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def _from_surrogates(token: str) -> str:
  """Joins surrogate pairs again; a lone one becomes "?" as in Java's UTF-8 output."""
  if not _SURROGATE.search(token):
    return token
  token = _SURROGATE_PAIR.sub(
      lambda m: chr(0x10000 + ((ord(m.group()[0]) - 0xD800) << 10) + ord(m.group()[1]) - 0xDC00),
      token)
  return _SURROGATE.sub("?", token)


# Lower-casing. Java's String.toLowerCase matches str.lower except for a Greek capital sigma: Java
# makes it final (ς) when a cased letter precedes it and none follows inside the same word, where
# words are what its (legacy, rule-based) word BreakIterator finds: letters with inner dashes,
# quotes or periods, numbers with inner commas or periods, possibly joined to each other.
_WORD_SEGMENT = re.compile(
    r"(?:L+(?:[m.q]L+)*d?)?(?:D+(?:[n.q]D+)*L+(?:[m.q]L+)*d?)*(?:D+(?:[n.q]D+)*o?)?"
    r"|[p.](?:D+(?:[n.q]D+)*L+(?:[m.q]L+)*d?)*(?:D+(?:[n.q]D+)*o?)?")
_JAVA_CASED_EXTRA = re.compile(
    "[\u02b0-\u02b8\u02c0\u02c1\u02e0-\u02e4\u0345\u037a\u1d2c-\u1d61\u2160-\u217f"
    "\u24b6-\u24e9]")


def _word_break_class(char: str) -> str:
  """One letter naming `char`'s class in Java's legacy word-break rules."""
  if char in "\"'":
    return "q"  # inside words and numbers
  if char == ".":
    return "."  # inside words and numbers, before numbers
  if char in "\u00ad\u2027":
    return "m"  # inside words
  category = unicodedata.category(char)
  if category in ("Mn", "Me", "Cf"):
    return "I"  # counts as the character before it
  if char in "\u0964\u0965":
    return "d"
  if "\u3005" == char or "\u4e00" <= char <= "\u9fa5" or "\uf900" <= char <= "\ufa2d" or (
      "\u3041" <= char <= "\u309e" or "\u30a1" <= char <= "\u30fe"):
    return "X"  # kanji and kana form words of their own
  if category[0] == "L" or category == "Mc" or "\u0e00" <= char <= "\u0e7f":
    return "L"
  if category[0] == "N":
    return "D"
  if category in ("Pd", "Pc"):
    return "m"
  if char in ",\u066b":
    return "n"
  if (category == "Sc" and char != "\u00a2") or char == "#":
    return "p"
  if char in "%&\u00a2\u066a\u2030\u2031":
    return "o"
  return "X"


def _java_is_cased(char: str) -> bool:
  return unicodedata.category(char) in ("Lu", "Ll", "Lt") or bool(_JAVA_CASED_EXTRA.match(char))


def _java_lower(token: str) -> str:
  """`token.toLowerCase(Locale.ENGLISH)` as Java computes it."""
  if "\u03a3" not in token:
    return token.lower()
  classes = []
  for char in token:
    kind = _word_break_class(char)
    classes.append(classes[-1] if kind == "I" and classes else kind)
  skeleton = "".join(classes)
  starts = set()
  at = 0
  while at < len(skeleton):
    starts.add(at)
    at = max(at + 1, _WORD_SEGMENT.match(skeleton, at).end())
  pieces = []
  for index, char in enumerate(token):
    if char != "\u03a3":
      pieces.append(char.lower())
      continue
    start = max(i for i in starts if i <= index)
    later = [i for i in starts if i > index]
    end = min(later) if later else len(token)
    final = (any(_java_is_cased(c) for c in token[start:index]) and
             not any(_java_is_cased(c) for c in token[index + 1:end]))
    pieces.append("\u03c2" if final else "\u03c3")
  return "".join(pieces)


def tokenize_captions(captions) -> list[str]:
  """Tokenizes captions exactly as coco-caption's PTBTokenizer does, all in one text.

  Args:
    captions: raw caption strings, in the order coco-caption would see them.

  Returns:
    One string per caption: lower-cased PTB tokens joined by single spaces, coco-caption's
    punctuation removed ("" when nothing is left). Tokens may hold U+00A0 (no-break space),
    as PTBTokenizer's do in fractions and phone numbers.
  """
  captions = list(captions)
  if not captions:
    return []
  text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
  utf16 = _ASTRAL.search(text) is not None
  if utf16:  # Java lexes UTF-16 code units: an emoji is two (untokenizable) characters there.
    text = _ASTRAL.sub(_to_surrogates, text)
  lines = [[]]
  for token in _lex(text):
    if token is _NEWLINE_TOKEN:
      lines.append([])
    else:
      if utf16:
        token = _from_surrogates(token)
      lines[-1].append(_java_lower(token))
  # What coco-caption does with each output line.
  return [" ".join(word for word in " ".join(line).rstrip().split(" ") if word not in PUNCTUATIONS)
          for line in lines]


def ptb_tokenize(text: str) -> list[str]:
  """Tokens of one caption as coco-caption's PTBTokenizer gives them (lower case, no punctuation).

  >>> ptb_tokenize("A dog's toy (red).")
  ['a', 'dog', "'s", 'toy', '-lrb-', 'red', '-rrb-']
  """
  return [word for word in tokenize_captions([text])[0].split(" ") if word]
