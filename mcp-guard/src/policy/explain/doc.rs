//! A small document model for `policy explain` and `policy diff`: headings, paragraphs and
//! bullet lists of sentences, each sentence citing where it comes from. The prose is built
//! once and rendered as Markdown or as plain text, so both formats always say the same thing.

use std::fmt::Write as _;

use super::ExplainFormat;

/// Where plain-text lines are wrapped.
const TEXT_WIDTH: usize = 100;

/// A piece of a sentence: prose, or a name or value quoted verbatim (`code` in Markdown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    Text(String),
    Code(String),
}

/// A sentence without its final full stop; the renderer adds citations and punctuation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sentence(Vec<Span>);

impl Sentence {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.push_text(text);
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.0.push(Span::Code(code.into()));
        self
    }

    /// Appends another sentence's spans.
    pub fn then(mut self, other: Sentence) -> Self {
        for span in other.0 {
            match span {
                Span::Text(text) => self.push_text(text),
                code => self.0.push(code),
            }
        }
        self
    }

    /// The sentence with its first letter upper-cased, when it starts with prose.
    pub fn capitalized(mut self) -> Self {
        if let Some(Span::Text(text)) = self.0.first_mut()
            && let Some(first) = text.chars().next()
        {
            let rest = text[first.len_utf8()..].to_owned();
            *text = first.to_uppercase().chain(rest.chars()).collect();
        }
        self
    }

    /// Adjacent prose is merged, so that two sentences saying the same thing compare equal
    /// however they were assembled.
    fn push_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(Span::Text(last)) => last.push_str(&text),
            _ => self.0.push(Span::Text(text)),
        }
    }

    /// `items` joined as in English: "a", "a and b", "a, b and c" (with `conjunction`).
    pub fn list(items: impl IntoIterator<Item = Sentence>, conjunction: &str) -> Sentence {
        let items: Vec<Sentence> = items.into_iter().collect();
        let count = items.len();
        let mut joined = Sentence::new();
        for (index, item) in items.into_iter().enumerate() {
            if index > 0 {
                let separator = if index + 1 == count {
                    format!(" {conjunction} ")
                } else {
                    ", ".to_owned()
                };
                joined = joined.text(separator);
            }
            joined = joined.then(item);
        }
        joined
    }

    /// Names quoted verbatim and joined as in English.
    pub fn codes<S: AsRef<str>>(names: impl IntoIterator<Item = S>, conjunction: &str) -> Self {
        Self::list(
            names
                .into_iter()
                .map(|name| Sentence::new().code(name.as_ref())),
            conjunction,
        )
    }

    /// The sentence as plain text, for comparing and sorting.
    pub fn plain(&self) -> String {
        self.render(ExplainFormat::Text)
    }

    fn render(&self, format: ExplainFormat) -> String {
        self.0
            .iter()
            .map(|span| match (span, format) {
                (Span::Text(text), ExplainFormat::Markdown) => escape_markdown(text),
                (Span::Code(code), ExplainFormat::Markdown) => markdown_code(code),
                (Span::Text(text) | Span::Code(text), ExplainFormat::Text) => one_line(text),
            })
            .collect()
    }
}

/// Where a statement comes from, so that a reviewer can find it in the policy file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cite {
    /// An MCP rule of the old policy (in a diff), by id; sorts first, as what was comes
    /// before what is.
    OldRule(String),
    /// An MCP rule of the server being described, by id.
    Rule(String),
    /// An egress rule of the server being described, by id.
    Egress(String),
    /// A setting, by its JSON path in the policy, such as `audit.fsync`.
    Setting(String),
    /// Behaviour built into mcp-guard rather than written in the policy, such as default deny.
    Builtin(&'static str),
}

impl Cite {
    pub fn setting(path: impl Into<String>) -> Self {
        Self::Setting(path.into())
    }

    fn render(&self) -> Sentence {
        match self {
            Self::Rule(id) => Sentence::new().text("rule ").code(id),
            Self::OldRule(id) => Sentence::new().text("old rule ").code(id),
            Self::Egress(id) => Sentence::new().text("egress rule ").code(id),
            Self::Setting(path) => Sentence::new().code(path),
            Self::Builtin(what) => Sentence::new().text(*what),
        }
    }
}

/// One sentence with its sources, an optional note quoting the policy's own words, and
/// sentences that detail it (rendered as a nested list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sentence: Sentence,
    pub cites: Vec<Cite>,
    /// The description the policy gives the rule or setting, quoted.
    pub note: Option<String>,
    pub details: Vec<Statement>,
}

impl Statement {
    pub fn new(sentence: Sentence, cite: Cite) -> Self {
        Self {
            sentence,
            cites: vec![cite],
            note: None,
            details: Vec::new(),
        }
    }

    /// A statement that details a cited one and needs no citation of its own.
    pub fn uncited(sentence: Sentence) -> Self {
        Self {
            sentence,
            cites: Vec::new(),
            note: None,
            details: Vec::new(),
        }
    }

    pub fn with_note(mut self, note: Option<&str>) -> Self {
        self.note = note.map(str::to_owned);
        self
    }

    pub fn with_details(mut self, details: Vec<Statement>) -> Self {
        self.details = details;
        self
    }

    /// The key that identifies what this statement is about across two policies: its first
    /// citation.
    pub fn key(&self) -> Option<&Cite> {
        self.cites.first()
    }

    /// The sentence, citations and note as one line; with `format`, for rendering and
    /// comparing.
    fn line(&self, format: ExplainFormat) -> String {
        let mut line = self.sentence.render(format);
        if !self.cites.is_empty() {
            let cites = Sentence::list(self.cites.iter().map(Cite::render), "and");
            let _ = write!(line, " [{}]", cites.render(format));
        }
        line.push('.');
        if let Some(note) = &self.note {
            let note = Sentence::new().text(note.trim()).render(format);
            let _ = write!(line, " Purpose: “{note}”");
        }
        line
    }

    /// The statement as plain text on one line, for comparing two policies' statements.
    pub fn plain(&self) -> String {
        self.line(ExplainFormat::Text)
    }
}

/// A part of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    Heading(u8, Sentence),
    Paragraph(Statement),
    Bullets(Vec<Statement>),
}

/// A document: blocks in reading order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    blocks: Vec<Block>,
}

impl Document {
    pub fn heading(&mut self, level: u8, title: Sentence) {
        self.blocks.push(Block::Heading(level, title));
    }

    pub fn paragraph(&mut self, statement: Statement) {
        self.blocks.push(Block::Paragraph(statement));
    }

    /// A bullet list; an empty one is left out.
    pub fn bullets(&mut self, statements: Vec<Statement>) {
        if !statements.is_empty() {
            self.blocks.push(Block::Bullets(statements));
        }
    }

    /// A heading followed by its bullets, both left out when there are none.
    pub fn section(&mut self, level: u8, title: Sentence, statements: Vec<Statement>) {
        if !statements.is_empty() {
            self.heading(level, title);
            self.bullets(statements);
        }
    }

    pub fn render(&self, format: ExplainFormat) -> String {
        let parts: Vec<String> = self
            .blocks
            .iter()
            .map(|block| match format {
                ExplainFormat::Markdown => markdown_block(block),
                ExplainFormat::Text => text_block(block),
            })
            .collect();
        // A blank line between blocks: Markdown needs it, and it reads well as text.
        let mut out = parts.join("\n\n");
        out.push('\n');
        out
    }
}

fn markdown_block(block: &Block) -> String {
    match block {
        Block::Heading(level, title) => format!(
            "{} {}",
            "#".repeat(usize::from(*level)),
            title.render(ExplainFormat::Markdown)
        ),
        Block::Paragraph(statement) => statement.line(ExplainFormat::Markdown),
        Block::Bullets(statements) => bullet_list(statements, &|statement, indent| {
            format!("{indent}- {}", statement.line(ExplainFormat::Markdown))
        }),
    }
}

fn text_block(block: &Block) -> String {
    match block {
        Block::Heading(level, title) => {
            let title = title.render(ExplainFormat::Text);
            match level {
                1 => format!("{title}\n{}", "=".repeat(title.chars().count())),
                2 => format!("{title}\n{}", "-".repeat(title.chars().count())),
                _ => format!("{title}:"),
            }
        }
        Block::Paragraph(statement) => wrap(&statement.line(ExplainFormat::Text), "", ""),
        Block::Bullets(statements) => bullet_list(statements, &|statement, indent| {
            wrap(
                &statement.line(ExplainFormat::Text),
                &format!("{indent}- "),
                &format!("{indent}  "),
            )
        }),
    }
}

/// Statements as a bullet list, details nested two spaces deeper; `bullet` renders one
/// statement at the indentation it is given.
fn bullet_list(statements: &[Statement], bullet: &dyn Fn(&Statement, &str) -> String) -> String {
    fn push(
        statement: &Statement,
        depth: usize,
        bullet: &dyn Fn(&Statement, &str) -> String,
        lines: &mut Vec<String>,
    ) {
        lines.push(bullet(statement, &"  ".repeat(depth)));
        for detail in &statement.details {
            push(detail, depth + 1, bullet, lines);
        }
    }
    let mut lines = Vec::new();
    for statement in statements {
        push(statement, 0, bullet, &mut lines);
    }
    lines.join("\n")
}

/// Greedy word wrap at [`TEXT_WIDTH`]: `first` starts the first line, `rest` the others. A
/// word longer than a line (a long URL, say) gets a line of its own rather than being cut.
fn wrap(text: &str, first: &str, rest: &str) -> String {
    let mut out = String::from(first);
    let mut line_len = first.chars().count();
    let mut line_has_word = false;
    for word in text.split(' ').filter(|word| !word.is_empty()) {
        let word_len = word.chars().count();
        if line_has_word && line_len + 1 + word_len > TEXT_WIDTH {
            out.push('\n');
            out.push_str(rest);
            line_len = rest.chars().count();
            line_has_word = false;
        }
        if line_has_word {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word_len;
        line_has_word = true;
    }
    out
}

/// Policy text may hold line breaks; every sentence is rendered on one line.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n', '\t'], " ")
}

/// Prose from the policy (descriptions) must not turn into emphasis, links or HTML.
fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in one_line(text).chars() {
        if matches!(c, '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Markdown code span holding `code` verbatim: fenced with more backticks than the longest
/// run inside it, padded when it starts or ends with a backtick.
fn markdown_code(code: &str) -> String {
    let code = one_line(code);
    let longest_run = code.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest_run + 1);
    if code.starts_with('`') || code.ends_with('`') {
        format!("{fence} {code} {fence}")
    } else {
        format!("{fence}{code}{fence}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_as_english() {
        let three = Sentence::codes(["a", "b", "c"], "or");
        assert_eq!(three.plain(), "a, b or c");
        assert_eq!(Sentence::codes(["a", "b"], "and").plain(), "a and b");
        assert_eq!(Sentence::codes(["a"], "and").plain(), "a");
        assert_eq!(three.render(ExplainFormat::Markdown), "`a`, `b` or `c`");
    }

    #[test]
    fn markdown_quotes_code_and_escapes_prose() {
        let sentence = Sentence::new().text("a *b* [c]").code("x`y");
        assert_eq!(
            sentence.render(ExplainFormat::Markdown),
            "a \\*b\\* \\[c\\]``x`y``"
        );
        assert_eq!(markdown_code("`"), "`` ` ``");
    }

    #[test]
    fn statements_end_with_their_citations_and_a_full_stop() {
        let statement = Statement::new(
            Sentence::new().text("Anyone may ").code("ping"),
            Cite::Rule("p".into()),
        )
        .with_note(Some("Keep-alive."));
        assert_eq!(
            statement.line(ExplainFormat::Markdown),
            "Anyone may `ping` [rule `p`]. Purpose: “Keep-alive.”"
        );
        assert_eq!(
            statement.plain(),
            "Anyone may ping [rule p]. Purpose: “Keep-alive.”"
        );
    }

    #[test]
    fn text_wraps_with_a_hanging_indent() {
        let words = vec!["word"; 40].join(" ");
        let wrapped = wrap(&words, "- ", "  ");
        for line in wrapped.lines() {
            assert!(line.chars().count() <= TEXT_WIDTH, "{line}");
        }
        assert!(
            wrapped
                .lines()
                .skip(1)
                .all(|line| line.starts_with("  word"))
        );
        let long = "x".repeat(150);
        assert_eq!(wrap(&format!("a {long}"), "", ""), format!("a\n{long}"));
    }

    #[test]
    fn text_headings_are_underlined_and_markdown_headings_hashed() {
        let mut doc = Document::default();
        doc.heading(1, Sentence::new().text("Policy"));
        doc.heading(3, Sentence::new().text("May do"));
        assert_eq!(
            doc.render(ExplainFormat::Text),
            "Policy\n======\n\nMay do:\n"
        );
        assert_eq!(
            doc.render(ExplainFormat::Markdown),
            "# Policy\n\n### May do\n"
        );
    }
}
