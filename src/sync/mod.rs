//! The sync model, pure: records with version vectors, reconciliation, conflicts.
//! No I/O happens here; the engine executes what [`diff::plan`] decides.
//!
//! - Every path ever seen has a [`Record`], tombstones included (so a deletion
//!   cannot be undone by a peer that missed it). Its [`VersionVector`] counts each
//!   node's changes to that path.
//! - Comparing a peer's record with ours ([`diff::decide`]): the same version needs
//!   nothing; a dominating one is applied (fetch, mkdir, symlink, delete); a
//!   dominated one is ignored, as the peer will pull ours; concurrent versions with
//!   the same content only merge their vectors.
//! - Concurrent versions with different content are a conflict that
//!   [`conflict::winner`] settles identically on every node, without talking. Only
//!   the node holding the losing version acts: it keeps it as a conflict copy
//!   ([`conflict::conflict_name`]) and takes the winner under the merged vector.
//! - [`diff::plan`] does this for a batch, turns fetches into local renames and
//!   copies where the content is already here, refuses unsafe paths, and orders
//!   the steps so directories exist before their contents and are emptied before
//!   they are removed.

pub mod conflict;
pub mod diff;
pub mod record;
pub mod version;

pub use conflict::Side;
pub use diff::{LocalIndex, Plan, Step};
pub use record::{Kind, Record};
pub use version::{VersionVector, VvOrdering};
