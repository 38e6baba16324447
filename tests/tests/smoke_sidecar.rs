//! The fixture itself works: billing is admitted through the proxy and the laptop is not.

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};

#[tokio::test]
async fn billing_is_admitted_and_the_laptop_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let client = d.connect("billing", "billing").await?;
    let row = client.query_one("select current_user::text", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "billing");
    let Err(err) = d.connect("finance-laptop", "finance-laptop").await else {
        panic!("the laptop was admitted");
    };
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err}");
    let line = d
        .wait_for_decision(|l| {
            l["spiffe_id"] == "spiffe://corp.example/workstations/finance-laptop"
        })
        .await?;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["alert"], true);
    Ok(())
}
